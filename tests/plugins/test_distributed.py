"""Data-parallel training (plugins/distributed.py and the core's part in it): N processes reach the
answer one process reaches with the same global batch; rank 0 alone writes; a failure or a signal
on one process ends them all with one message; checkpoints resume with the same or another number
of processes.

Two processes on the CPU with gloo, started two ways: `torch.multiprocessing` (each process runs
several jobs through `engine.run`, as a user's script would under torchrun, so the start-up of
torch is paid once), and the CLI with ``--nproc 2`` as a user types it. The one-process answers
are computed here, in the test's own process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing
from engine_plugins import accelerate
from engine_plugins.batching import build_loaders
from engine_plugins.batching.splits import split

import engine
from tests.conftest import REPO
from tests.helpers import read_json, read_jsonl

WORLD = 2
# 241 training samples in global batches of 64: 64, 64, 64 and 49, which two processes split
# 25 + 24; four batches an epoch make accumulation windows of 3 and 1 with grad_accumulation = 3.
MLP = {
    "epochs": 4,
    "seed": 3,
    "data": {"name": "classification", "n_samples": 301, "n_features": 8, "batch_size": 64, "val_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16]},
    "loss": {"name": "cross_entropy"},
    "log": {"every": 1},
}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAM = {"name": "adam", "lr": 0.01}
DATASET = {
    **MLP,
    "grad_accumulation": 2,
    "data": {"name": "tests.helpers:blobs_dataset", "n_samples": 150, "batch_size": 32, "val_fraction": 0.2},
}


# Early stopping with the best weights restored, TensorBoard, the whole-set metrics and their
# confusion matrix: rank 0 writes, every process stops at the same epoch.
WATCHED = {
    "epochs": 30,
    "optimizer": {"name": "adam", "lr": 0.05},
    "early_stopping": {"patience": 2, "monitor": "val_loss", "restore_best": True},
    "tensorboard": {"enabled": True},
}


def jobs_with(**changes: Any) -> dict[str, Any]:
    return {**MLP, **changes}


# --- what each process takes of the data (no processes needed) ------------------------------------


def loaders(job: dict[str, Any], rank: int, world_size: int) -> engine.Loaders:
    config, plugins = engine.load_config(job)
    data = engine.build_component(config, plugins, "data", seed=config["seed"], device=torch.device("cpu"))
    return build_loaders(data, config, config["seed"], torch.device("cpu"), rank, world_size)


@pytest.mark.parametrize("job", [MLP, DATASET], ids=["tensors", "dataset"])
def test_each_process_takes_its_piece_of_every_batch_of_the_same_order(job):
    one = loaders(job, 0, 1)
    pieces = [loaders(job, rank, WORLD) for rank in range(WORLD)]
    n = one.info.n_train
    for epoch, start in ((1, 0), (2, 0), (2, 3)):  # a resumed run starts at a batch
        whole = list(one.train(epoch, start))
        parts = [list(part.train(epoch, start)) for part in pieces]
        assert [len(batches) for batches in parts] == [len(whole)] * WORLD
        for index, batch in enumerate(whole):
            assert torch.equal(torch.cat([batches[index].x for batches in parts]), batch.x)
            assert torch.equal(torch.cat([batches[index].y for batches in parts]), batch.y)
    size = job["data"]["batch_size"]
    last = n - (one.train_batches() - 1) * size  # 49 of 241, 24 of 120: split 25 + 24, 12 + 12
    first, second = split(last, WORLD, 0), split(last, WORLD, 1)
    shares = [(high - low) * WORLD / last for low, high in (first, second)]
    assert [part.shares() for part in pieces] == [[1.0] * (one.train_batches() - 1) + [share] for share in shares]
    assert torch.equal(
        torch.cat([batch.y for part in pieces for batch in part.val()]), torch.cat([batch.y for batch in one.val()])
    )
    assert all(part.info == one.info for part in pieces)  # the whole data's sizes


def test_the_shares_scale_the_loss_of_an_uneven_batch():
    shares = [1.0, 1.0, 50 / 49]
    assert engine.windows(shares, 2) == (
        engine.Window(True, False, 0.5),
        engine.Window(False, True, 0.5),
        engine.Window(True, True, 50 / 49),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": 63}, "data.batch_size: 63 is the global batch, split over 2 processes: it must divide by 2"),
        (
            {"n_samples": 161, "batch_size": 32},  # 129 training samples: a last batch of 1
            "data: the last batch of an epoch is smaller (1) than the number of processes (2): set data.drop_last",
        ),
        ({"n_samples": 7, "batch_size": 2}, "data: the validation set is smaller (1) than the number of processes (2)"),
    ],
)
def test_data_that_two_processes_cannot_share_is_a_config_error(data, message):
    job = {**MLP, "data": {**MLP["data"], **data}}
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        loaders(job, 1, WORLD)
    loaders(job, 0, 1)  # one process takes them


# --- several processes, each running jobs through engine.run --------------------------------------


class NanOnRankOne:
    """A loss term that is NaN on rank 1 only, from its third step."""

    @engine.hookimpl
    def compute_loss(self, output, trainer):
        if trainer.rank == 1 and trainer.state.step >= 3:
            return {"bad": output.sum() * float("nan")}
        return {"bad": output.sum() * 0}


class CrashAt:
    """Every process raises after step `step`, as if the machine had gone: what a resume starts from."""

    def __init__(self, step: int) -> None:
        self.step = step

    @engine.hookimpl
    def after_step(self, state):
        if state.step == self.step:
            raise RuntimeError("gone")


class SlowerOnOneRank:
    """An accelerate candidate, "rival", of the eager step's maths, and a clock for `auto` that says
    the eager trial is fast on rank 0 and slow on rank 1, the rival the other way round: each
    process alone would choose differently. Records what ran each step."""

    build_seconds = 0.0

    def __init__(self) -> None:
        self.now, self.rank, self.in_rival, self.ran = 0.0, 0, False, []

    @engine.hookimpl
    def register_components(self):
        return {"accelerate": {"rival": lambda: self}}

    def unavailable(self) -> str | None:
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def step(self, step: engine.Step) -> engine.Step:
        def rival(batch: engine.Batch, window: engine.Window) -> Any:
            self.in_rival = True
            try:
                return step(batch, window)
            finally:
                self.in_rival = False

        return rival

    @engine.hookimpl
    def on_run_start(self, trainer):
        self.rank = trainer.rank
        accelerate.time = SimpleNamespace(perf_counter=lambda: self.now)

    @engine.hookimpl
    def before_forward(self, trainer):
        if not trainer.model.training:
            return  # the setup's check, validation
        slow = self.in_rival if self.rank == 0 else not self.in_rival
        self.now += 1.0 if slow else 0.1
        self.ran.append("rival" if self.in_rival else "eager")

    @engine.hookimpl
    def on_run_end(self):
        accelerate.time = time

    def report(self) -> list[str]:
        return self.ran


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


Jobs = list[tuple[str, dict[str, Any] | None, dict[str, Any]]]


def worker(rank: int, out: Path, jobs: Jobs, ports: list[int]) -> None:
    """One of the run's processes: the environment torchrun gives it, then each job in turn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS
    for (name, job, options), port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        try:
            result = engine.run(job, **options)
            record = {"weights": result.model.state_dict(), "metrics": result.metrics, "run_dir": result.run_dir}
            record["reports"] = [plugin.report() for plugin in options.get("plugins", ()) if hasattr(plugin, "report")]
        except engine.EngineError as error:
            record = {"error": str(error), "shown": error.shown, "exit_code": error.exit_code}
        torch.save(record, out / f"{name}-{rank}.pt")


def in_processes(tmp_path: Path, jobs: Jobs) -> dict[str, list[dict]]:
    """Run `jobs` (name, job, engine.run options) one after another in two processes; what each
    process's run returned (or raised), by job name."""
    out = tmp_path / "results"
    out.mkdir()
    torch.multiprocessing.start_processes(
        worker, args=(out, jobs, free_ports(len(jobs))), nprocs=WORLD, start_method="spawn"
    )
    return {
        name: [torch.load(out / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)] for name, *_ in jobs
    }


def assert_close(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert weights.keys() == expected.keys()
    for name in weights:
        difference = (weights[name] - expected[name]).abs().max().item()
        assert difference <= atol, f"{name}: differs by {difference}"


# Adam with windows of 3 and 1 and an uneven last batch: every share and scale of the step.
PAIR = jobs_with(optimizer=ADAM, grad_accumulation=3)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One job in one pair of processes: the check the default run affords (about 10 s)."""
    tmp_path = tmp_path_factory.mktemp("pair")
    return in_processes(tmp_path, [("pair", {**PAIR, "runs_dir": str(tmp_path / "runs")}, {})])["pair"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every other multi-process job of this module, run once in one pair of processes."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    runs = {"runs_dir": str(tmp_path / "runs")}
    tokens = {**TOKENS, "data": {**TOKENS["data"], "path": str(tmp_path / "tokens.bin")}}
    np.random.RandomState(0).randint(40, size=4000).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    jobs: Jobs = [
        (f"{name}-{accumulation}", jobs_with(optimizer=optimizer, grad_accumulation=accumulation, **runs), {})
        for name, optimizer, accumulation in (("sgd", SGD, 1), ("sgd", SGD, 3), ("adam", ADAM, 1))
    ]
    jobs += [
        ("dataset", {**DATASET, **runs}, {}),
        ("compile", jobs_with(epochs=1, accelerate={"name": "compile"}, optimizer=ADAM, **runs), {}),
        # auto's trials, a step a round: eager's first step and its estimate, the rival's 5 untimed
        # steps, then 5 rounds of each in turn.
        (
            "auto",
            jobs_with(epochs=6, accelerate={"name": "auto", "steps": 5, "candidates": ["eager", "rival"]}, **runs),
            {"plugins": [SlowerOnOneRank()]},
        ),
        ("nan", jobs_with(optimizer=ADAM, **runs), {"plugins": [NanOnRankOne()]}),
        ("odd batch", jobs_with(data={**MLP["data"], "batch_size": 63}, **runs), {}),
        # A step checkpoint every 3 steps waits for the end of a window of 2: steps 4 and 6. Every
        # process fails after step 7; the run resumes from step 6.
        (
            "crashed",
            jobs_with(optimizer=ADAM, grad_accumulation=2, checkpoint={"every_steps": 3}, run_name="resumed", **runs),
            {"plugins": [CrashAt(7)]},
        ),
        ("resumed", None, {"resume": str(tmp_path / "runs" / "resumed")}),
        ("watched", jobs_with(run_name="watched", **WATCHED, **runs), {}),
        ("tokens", {**tokens, **runs}, {}),
    ]
    return {**in_processes(tmp_path, jobs), "tokens job": tokens}


# A language model on random windows of a token file: each process takes its piece of every
# global batch of windows (plugins/tokens), with dropout, validation and logging by steps.
TOKENS = {
    "max_steps": 6,
    "seed": 5,
    "val_every_steps": 3,
    "log": {"every_steps": 2},
    "data": {"name": "tokens", "block_size": 8, "batch_size": 8, "val_fraction": 0.1},
    "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "adamw", "lr": 0.01, "decay": "matrices"},
}


def one_process(job: dict[str, Any], **options: Any) -> engine.Result:
    return engine.run({**job, "run_name": "one"}, **options)


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(pair):
    expected = one_process(PAIR)
    for rank in pair:
        assert_close(rank["weights"], expected.model.state_dict())
    # The metrics are every process's: the same on each, and one process's within rounding.
    assert pair[0]["metrics"] == pair[1]["metrics"]
    assert pair[0]["metrics"] == pytest.approx(expected.metrics, rel=1e-5)
    assert pair[0]["run_dir"] == pair[1]["run_dir"]  # one run, its directory named by rank 0


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "accumulation"), [("sgd", 1), ("sgd", 3), ("adam", 1)])
def test_two_processes_reach_the_weights_of_one_with_other_optimizers_and_windows(
    two_processes, optimizer, accumulation
):
    job = jobs_with(optimizer=SGD if optimizer == "sgd" else ADAM, grad_accumulation=accumulation)
    expected = one_process(job)
    ranks = two_processes[f"{optimizer}-{accumulation}"]
    for rank in ranks:
        assert_close(rank["weights"], expected.model.state_dict())
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"] == pytest.approx(expected.metrics, rel=1e-5)


@pytest.mark.slow
def test_two_processes_on_random_windows_of_a_token_file_reach_the_weights_of_one(two_processes):
    expected = one_process(two_processes["tokens job"])
    for rank in two_processes["tokens"]:
        assert_close(rank["weights"], expected.model.state_dict())
    assert two_processes["tokens"][0]["metrics"] == pytest.approx(expected.metrics, rel=1e-5)


@pytest.mark.slow
def test_a_dataset_is_shared_by_a_sampler_with_the_same_answer(two_processes):
    expected = one_process(DATASET)
    for rank in two_processes["dataset"]:
        assert_close(rank["weights"], expected.model.state_dict())


@pytest.mark.slow
def test_compile_works_with_ddp(two_processes):
    expected = one_process(jobs_with(epochs=1, optimizer=ADAM))
    for rank in two_processes["compile"]:
        assert_close(rank["weights"], expected.model.state_dict(), atol=1e-4)


@pytest.mark.slow
def test_auto_makes_one_choice_on_every_process(two_processes):
    # Each candidate is timed by its slowest process: 1.0 a step for both, a tie that keeps eager.
    ran = [rank["reports"][0] for rank in two_processes["auto"]]
    trials = ["eager"] * 2 + ["rival"] * 5 + ["eager", "rival"] * 5
    assert ran[0] == ran[1] == trials + ["eager"] * (6 * 4 - len(trials))
    expected = one_process(jobs_with(epochs=6))
    for rank in two_processes["auto"]:
        assert_close(rank["weights"], expected.model.state_dict())


@pytest.mark.slow
def test_the_nan_guard_sees_every_process_and_stops_all_with_one_message(two_processes):
    ranks = two_processes["nan"]
    message = "non-finite loss (nan) in term 'bad' at epoch 1, step 3; training stopped"
    # Both see the reduced NaN: the process that reports first names itself, and the other takes its message.
    assert ranks[0]["error"] == ranks[1]["error"]
    assert re.fullmatch(rf"rank [01], {re.escape(message)}", ranks[0]["error"])
    assert sorted(rank["shown"] for rank in ranks) == [False, True]  # printed once


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_is_a_config_error(two_processes):
    ranks = two_processes["odd batch"]
    message = "data.batch_size: 63 is the global batch, split over 2 processes: it must divide by 2"
    assert [(rank["error"], rank["exit_code"]) for rank in ranks] == [(message, 2), (message, 2)]
    assert sorted(rank["shown"] for rank in ranks) == [False, True]


@pytest.mark.slow
def test_a_checkpoint_resumes_with_the_same_number_of_processes(two_processes):
    crashed, resumed = two_processes["crashed"], two_processes["resumed"]
    assert all("step 7" in rank["error"] and "RuntimeError: gone" in rank["error"] for rank in crashed)
    expected = one_process(jobs_with(optimizer=ADAM, grad_accumulation=2))
    for rank in resumed:
        assert_close(rank["weights"], expected.model.state_dict())
    run_dir = resumed[0]["run_dir"]
    assert resumed[1]["run_dir"] == run_dir
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["resumed_from"] == "checkpoints/step-000000006.pt"
    assert [line["step"] for line in read_jsonl(run_dir / "metrics.jsonl")] == [4, 8, 12, 16]


@pytest.mark.slow
def test_early_stopping_metrics_and_loggers_agree_across_processes_and_rank_0_writes(two_processes):
    expected = one_process(jobs_with(**WATCHED))
    ranks = two_processes["watched"]
    for rank in ranks:
        assert_close(rank["weights"], expected.model.state_dict())
        assert rank["metrics"] == pytest.approx(expected.metrics, rel=1e-5)
    # torchmetrics reduced the whole-set metrics over both processes' validation halves.
    assert {"val_f1", "val_auroc", "val_precision"} <= ranks[0]["metrics"].keys()
    run_dir = ranks[0]["run_dir"]
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["epochs_completed"] < WATCHED["epochs"]  # stopped early
    assert summary["epochs_completed"] == read_json(expected.run_dir / "summary.json")["epochs_completed"]
    assert read_json(run_dir / "confusion_matrix.json") == read_json(expected.run_dir / "confusion_matrix.json")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


# --- the CLI, as a user runs it -------------------------------------------------------------------

# Raises on the rank and at the step the environment names (a no-op without it).
FAILING = """
import os

import engine


@engine.hookimpl
def after_step(state, trainer):
    if trainer.rank == int(os.environ.get("FAIL_RANK", -1)) and state.step == 3:
        raise ValueError("boom")
"""
# Rank 0 sends SIGTERM to the launcher that started it (its parent), as `timeout` or a scheduler
# would, after the step the environment names; a no-op without it.
TERMINATING = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state, trainer):
    if trainer.rank == 0 and state.step == int(os.environ.get("TERM_AT", 0)):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(0.2)  # the launcher sends it on to every process
"""


def command(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_an_error_on_one_process_ends_every_process_with_its_message(tmp_path):
    """Under torchrun, as README.md shows it: rank 1 fails at step 3; rank 0, waiting for it in the
    gradient all-reduce, stops at once and writes the failed summary with rank 1's message."""
    (tmp_path / "failing.py").write_text(FAILING)
    (tmp_path / "job.toml").write_text(engine.dump_toml({**MLP, "run_name": "failing"}))
    torchrun = Path(sys.executable).parent / "torchrun"
    started = time.monotonic()
    done = command(
        tmp_path,
        *(str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "engine", "run", "job.toml"),
        *("--plugin", "failing"),
        FAIL_RANK="1",
    )
    assert time.monotonic() - started < 120  # no collective waited for its timeout (30 minutes)
    assert done.returncode == 1
    message = "rank 1, epoch 1, step 3: plugin 'failing' failed in hook after_step: ValueError: boom"
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [f"error: {message}"]
    run_dir = tmp_path / "runs" / "failing"
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["failing"]
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["error"] == message
    assert done.stdout.count("Run files:") == 1  # rank 0 alone writes and prints


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_and_one_resumes_the_run(tmp_path, monkeypatch):
    """``--nproc 2`` (torch's launcher API): SIGTERM to the launcher after step 5 ends the run at
    the end of its accumulation window, with a checkpoint; one process resumes it to the weights
    of a run that was never stopped."""
    (tmp_path / "terminating.py").write_text(TERMINATING)
    job = {**MLP, "epochs": 6, "optimizer": ADAM, "grad_accumulation": 2}
    (tmp_path / "job.toml").write_text(engine.dump_toml({**job, "run_name": "stopped"}))
    done = command(
        tmp_path,
        sys.executable,
        "-m",
        "engine",
        "run",
        "job.toml",
        "--nproc",
        "2",
        "--plugin",
        "terminating",
        TERM_AT="5",
    )
    assert done.returncode == 143, done.stderr
    run_dir = tmp_path / "runs" / "stopped"
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted" and summary["steps"] % 2 == 0  # a window's end
    assert [line for line in done.stderr.splitlines() if "interrupted" in line] == [
        f"interrupted by SIGTERM at epoch {summary['steps'] // 4 + 1}, step {summary['steps']}; "
        "continue with: python -m engine run --resume runs/stopped --trust-run"  # its job names a plugin
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    resumed = engine.run(resume=run_dir, plugins=["terminating"])  # the run's plugin, given again
    whole = engine.run({**job, "run_name": "whole"})
    assert_close(resumed.model.state_dict(), whole.model.state_dict())
    steps = [(line["epoch"], line["step"]) for line in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [(line["epoch"], line["step"]) for line in read_jsonl(whole.run_dir / "metrics.jsonl")]
