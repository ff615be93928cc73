"""torchrun's elastic agent and c10d rendezvous, as a user types the commands (README.md, "Larger
models"): a worker killed once is restarted and the run finishes with the weights of a run never
interrupted; a worker that keeps failing ends the job with its one-line error once the restarts
are spent; two launchers on this machine stand for two machines; a signal stops every process of
a sharded run at one step, where they take the last checkpoint together. All slow: each starts
torch's launcher and its processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
from tests.conftest import REPO
from tests.helpers import read_json, read_jsonl
from tests.plugins.test_distributed import ADAM, MLP, assert_close, free_ports

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
FSDP = {"distributed": {"strategy": "fsdp"}}
# Each of 6 epochs has 4 steps: 64, 64, 64 and 49 samples, shared by the processes.
JOB = {**MLP, "epochs": 6, "optimizer": ADAM, "checkpoint": {"every_steps": 3}, "resume": "auto", **FSDP}

# SIGKILL to rank 1 after step $KILL_AT, in the first attempt only (torchrun counts its restarts),
# once the checkpoint of the step before is on disk (written in the background): the one resumed.
KILLER = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state, trainer):
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    if first and trainer.rank == 1 and state.step == int(os.environ.get("KILL_AT", 0)):
        before = trainer.run_dir / "checkpoints" / f"step-{state.step - 1:09d}.dcp"
        for _ in range(600):
            if before.is_dir():
                break
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
"""
# Rank 1 fails at its first step, in every attempt.
FAILING = """
import engine


@engine.hookimpl
def after_step(trainer):
    if trainer.rank == 1:
        raise ValueError("boom")
"""
# Rank 0 sends SIGTERM to the launcher that started it (its parent), as a scheduler would.
TERMINATING = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state, trainer):
    if trainer.rank == 0 and state.step == int(os.environ.get("TERM_AT", 0)):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(0.2)  # the launcher sends it on to every process
"""


def write(tmp_path: Path, job: dict, **plugins: str) -> None:
    (tmp_path / "job.toml").write_text(engine.dump_toml(job))
    for name, source in plugins.items():
        (tmp_path / f"{name}.py").write_text(source)


def environment(**env: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}


def command(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=300)


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return engine.runs.load(run_dir / "model.pt", engine.runs.MODEL_FORMAT)["model"]


def test_a_killed_worker_is_restarted_and_the_run_ends_with_the_weights_of_one_never_interrupted(tmp_path):
    """``torchrun --max-restarts 1``: rank 1 is killed after step 10; torchrun stops rank 0 and
    starts both again, and they continue from the last checkpoint (resume = "auto"). Two processes
    doing the same sums in the same order: the final weights are the uninterrupted run's, bit for bit."""
    write(tmp_path, {**JOB, "run_name": "elastic"}, killer=KILLER)
    launch = (TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "engine", "run")
    done = command(tmp_path, *launch, "job.toml", "--plugin", "killer", KILL_AT="10")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "elastic"
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["resumed_from"] == "checkpoints/step-000000009.dcp"
    assert [line["step"] for line in read_jsonl(run_dir / "metrics.jsonl")] == [4, 8, 12, 16, 20, 24]
    never = command(tmp_path, *launch, "job.toml", "--set", "run_name=never")
    assert never.returncode == 0, never.stderr
    weights, expected = model(run_dir), model(tmp_path / "runs" / "never")
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_a_worker_that_keeps_failing_ends_the_job_with_its_error_once_the_restarts_are_spent(tmp_path):
    write(tmp_path, {**JOB, "run_name": "failing"}, failing=FAILING)
    run = (sys.executable, "-m", "engine", "run", "job.toml", "--plugin", "failing")
    done = command(tmp_path, *run, "--nproc", "2", "--max-restarts", "1")
    assert done.returncode == 1
    message = "rank 1, epoch 1, step 1: plugin 'failing' failed in hook after_step: ValueError: boom"
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {message}"
    ] * 2  # each attempt
    assert done.stderr.strip().splitlines()[-1] == f"error: {message}"
    summary = read_json(tmp_path / "runs" / "failing" / "summary.json")
    assert summary["status"] == "failed" and summary["error"] == message


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_machines_are_two_launchers_meeting_at_a_c10d_rendezvous(tmp_path, strategy):
    """What README.md tells to type on each of two machines, here twice on this one (which
    stands for a filesystem both share): rank 0 writes the run; with fsdp each node's shards land
    in the same checkpoint. The weights are one process's, to rounding."""
    job = {**JOB, "epochs": 4, "distributed": {"strategy": strategy}, "run_name": "nodes"}
    write(tmp_path, job)
    port = free_ports(1)[0]
    launch = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    launch += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes", "-m", "engine", "run", "job.toml"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    nodes = [subprocess.Popen(launch, cwd=tmp_path, env=environment(), **pipes) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    assert sum(out.count("Run files:") for out, _ in outputs) == 1  # rank 0 alone writes and prints
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["nodes"]
    run_dir = tmp_path / "runs" / "nodes"
    if strategy == "fsdp":
        shards = sorted(path.name for path in (run_dir / "checkpoints" / "step-000000016.dcp").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    one = engine.run({**job, "distributed": {}, "run_name": "one", "runs_dir": str(tmp_path / "one")})
    assert_close(model(run_dir), one.model.state_dict())


def test_a_signal_stops_every_sharding_process_at_one_step_and_one_process_resumes(tmp_path, monkeypatch):
    """SIGTERM to ``--nproc 2``'s launcher after step 5: the processes agree on the step to stop at,
    take the last checkpoint there together (each its shards) and exit 143; one process, sharding
    over itself, continues the run to the weights of a whole model never stopped."""
    job = {**JOB, "grad_accumulation": 2, "resume": ""}
    write(tmp_path, {**job, "run_name": "stopped"}, terminating=TERMINATING)
    started = time.monotonic()
    run = (sys.executable, "-m", "engine", "run", "job.toml", "--nproc", "2", "--plugin", "terminating")
    done = command(tmp_path, *run, TERM_AT="5")
    assert done.returncode == 143, done.stderr
    assert time.monotonic() - started < 120
    run_dir = tmp_path / "runs" / "stopped"
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted" and summary["steps"] % 2 == 0  # a window's end
    assert (run_dir / "checkpoints" / f"step-{summary['steps']:09d}.dcp" / "__1_0.distcp").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    resumed = engine.run(resume=run_dir, trust=True)  # its job names our plugin module
    whole = engine.run({**job, "distributed": {}, "run_name": "whole"})
    assert_close(model(resumed.run_dir), whole.model.state_dict())
