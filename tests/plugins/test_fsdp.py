"""``[distributed] strategy = "fsdp"`` (plugins/distributed/sharded.py) and its sharded checkpoints
(plugins/checkpoint/sharded.py): N processes sharding the model reach the weights one process
reaches with the same global batch; each holds about 1/N of the parameters and optimizer state; a
checkpoint is a directory every process writes its shards into, renamed whole, and resumes with
another number of processes; what does not work on a sharded model is refused in one line.

One process shards over itself (a process group of one, no launcher): those tests run in this
process. Two run as `torch.multiprocessing` processes under torchrun's environment, each running
several jobs through `engine.run`; what the default run affords is one job, the rest is slow.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing
from engine_plugins import checkpoint as checkpoint_plugin
from engine_plugins import datasets
from engine_plugins.cudagraph import Graphed
from engine_plugins.distributed import memory
from engine_plugins.distributed.sharded import layers, units
from torch import nn

import engine
from engine.cli import main
from tests.helpers import read_json, read_jsonl
from tests.plugins.test_distributed import ADAM, DATASET, MLP, SGD, CrashAt, assert_close, free_ports

WORLD = 2
FSDP = {"distributed": {"strategy": "fsdp"}}
ADAMW = {"name": "adamw", "lr": 0.01}
# The MLP job of tests/plugins/test_distributed.py, wider (32, 32): 241 training samples in global
# batches of 64, the last one of 49 split 25 + 24; every step's shares and windows are exercised.
SHARDED = {**MLP, "model": {"name": "mlp", "hidden": [32, 32]}, **FSDP}


def job(**changes: Any) -> dict[str, Any]:
    return {**SHARDED, **changes}


def whole(job: dict[str, Any]) -> dict[str, Any]:
    """The same job in one process, its model whole: the oracle."""
    return {key: value for key, value in job.items() if key != "distributed"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return engine.runs.load(run_dir / "model.pt", engine.runs.MODEL_FORMAT)["model"]


def steps(run_dir: Path) -> list[int]:
    return [step for step, _ in checkpoint_plugin.numbered(run_dir, "step")]


# --- one process sharding over itself (no launcher), in this process -------------------------------


def test_one_process_sharding_over_itself_trains_as_the_whole_model_does():
    sharded = job(optimizer=ADAMW, grad_accumulation=3, grad_clip={"max_norm": 0.5}, checkpoint={"every_steps": 6})
    result = engine.run({**sharded, "run_name": "sharded"})
    expected = engine.run({**whole(sharded), "run_name": "whole"})
    assert_close(final_weights(result.run_dir), expected.model.state_dict(), atol=0.0)
    assert result.metrics == pytest.approx(expected.metrics, rel=1e-6)
    # Checkpoints are directories of shards with the rest beside them; none is left half-written.
    assert steps(result.run_dir) == [12, 16]  # every 6 steps at a window's end (windows of 3 and 1), and the end
    folder = result.run_dir / "checkpoints"
    assert sorted(path.name for path in (folder / "step-000000016.dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "state.pt",
    ]
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]
    # engine.load reads a sharded checkpoint whole, without a process group; model.pt is one file.
    assert_close(engine.load(result.run_dir, which="last").state_dict(), expected.model.state_dict(), atol=0.0)
    assert not torch.distributed.is_initialized()  # the run left its group of one
    # So do the after-training commands: evaluate on the last checkpoint gives the final validation's figures.
    x, y = datasets.classification(seed=3, n_samples=60, n_features=8)
    np.savez("data.npz", x=x, y=y)
    evaluate = ["evaluate", str(result.run_dir), "--data", "data.npz", "--backend", "eager"]
    assert main([*evaluate, "--which", "last"]) == main(evaluate) == 0
    last, final = (read_json(result.run_dir / "evaluations" / f"data-{which}.json") for which in ("last", "final"))
    assert last["loss"] == pytest.approx(final["loss"], abs=1e-6)


def test_a_sharded_run_resumes_exactly_and_its_strategy_cannot_change_on_resume(tmp_path):
    sharded = job(optimizer=ADAM, epochs=6, checkpoint={"every_steps": 5}, run_name="resumed")
    with pytest.raises(engine.TrainingError):
        engine.run(sharded, plugins=[CrashAt(11)])
    assert steps(Path("runs/resumed")) == [8, 10]  # every 5 steps, and the best epochs' ends (4 steps each)
    resumed = engine.run(resume="runs/resumed")  # from step 10
    expected = engine.run({**whole(sharded), "run_name": "whole"})
    assert_close(final_weights(resumed.run_dir), expected.model.state_dict(), atol=0.0)
    summary = read_json(resumed.run_dir / "summary.json")
    assert summary["resumed_from"] == "checkpoints/step-000000010.dcp"
    assert [line["step"] for line in read_jsonl(resumed.run_dir / "metrics.jsonl")] == [4, 8, 12, 16, 20, 24]
    # The strategy is part of the run's course: a resume that changes it is refused, naming it; and
    # allowed to, a sharded checkpoint still needs a sharded run, a whole model's a whole-model run.
    with pytest.raises(engine.ConfigError, match=r"distributed.strategy 'fsdp' -> 'ddp'; a resume continues"):
        engine.setup(resume="runs/resumed", overrides=["distributed.strategy=ddp"])
    allowed = ["distributed.strategy"]
    with pytest.raises(engine.ConfigError, match=r"holds a sharded model \(distributed.strategy 'fsdp'\)"):
        engine.setup(resume="runs/resumed", overrides=["distributed.strategy=ddp"], allow_changes=allowed)
    with pytest.raises(engine.ConfigError, match="holds the whole model of a run whose model was not sharded"):
        engine.setup(resume=expected.run_dir, overrides=["distributed.strategy=fsdp"], allow_changes=allowed)
    assert not torch.distributed.is_initialized()


def test_the_time_trigger_falls_at_the_step_rank_0_estimated(monkeypatch):
    """A sharded checkpoint is taken by every process at one step: rank 0's clock, shared at steps
    1, 2, 4, 8, ... after each checkpoint as the step where `every_seconds` will have passed."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(checkpoint_plugin, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Slow:  # a step takes a quarter of a second of the plugin's clock
        @engine.hookimpl
        def after_step(self):
            clock.now += 0.25

    timed = job(epochs=2, data={**MLP["data"], "batch_size": 16}, checkpoint={"every_seconds": 1.0, "keep_last": 50})
    found = {}
    for name, strategy in (("sharded", "fsdp"), ("whole", "ddp")):
        clock.now = 0.0
        result = engine.run({**timed, "run_name": name, "distributed": {"strategy": strategy}}, plugins=[Slow()])
        found[name] = steps(result.run_dir)
    # Where rank 0's clock alone fires (a whole model's checkpoints), at the pace of the steps:
    # every 4 steps of a quarter second, and the end.
    assert found["sharded"] == found["whole"] == [4, 8, 12, 16, 20, 24, 28, 32]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_fsdp_on_one_gpu_over_nccl_trains_as_the_whole_model_does_and_resumes(precision):
    sharded = job(device="cuda", optimizer=ADAMW, precision={"name": precision}, checkpoint={"every_steps": 5})
    with pytest.raises(engine.TrainingError):
        engine.run({**sharded, "run_name": "gpu"}, plugins=[CrashAt(11)])
    resumed = engine.run(resume="runs/gpu")  # from step 10's sharded checkpoint, written from the GPU
    expected = {k: v.cpu() for k, v in engine.run({**whole(sharded), "run_name": "whole"}).model.state_dict().items()}
    atol = 1e-5
    if precision != "32":  # within the difference the format makes (see the two-process test)
        full = engine.run({**whole(sharded), "precision": {"name": "32"}, "run_name": "full"}).model.state_dict()
        atol = max((expected[key] - full[key].cpu()).abs().max().item() for key in expected) / 4
    assert_close(final_weights(resumed.run_dir), expected, atol=atol)
    assert read_json(resumed.run_dir / "summary.json")["resumed_from"] == "checkpoints/step-000000010.dcp"
    assert not torch.distributed.is_initialized()


# --- what the strategy shards, and what it refuses --------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.mlp = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x))


class Transformerish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(3, 4), nn.ModuleList([Block(), Block()]), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_the_units_are_the_models_layers_or_the_classes_named():
    mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    assert layers(mlp) == [mlp[0], mlp[2]]
    wrapped = engine.types.WithInputTransform(nn.Identity(), mlp)  # behind its input transform
    assert layers(wrapped) == [mlp[0], mlp[2]]
    assert layers(nn.Linear(1, 1)) == []  # the root alone
    model = Transformerish()
    assert layers(model) == [model.embed, *model.blocks, model.head]
    assert units(model, ["Block"]) == list(model.blocks)[::-1]
    assert units(model, ["Block", "Sequential"]) == [
        sub for sub in reversed(list(model.modules())) if isinstance(sub, (Block, nn.Sequential))
    ]
    with pytest.raises(engine.ConfigError, match=r"no submodule of class 'Attention' \(its classes: Block, GELU"):
        units(model, ["Attention", "Block"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ema": {"decay": 0.9}}, "ema.decay: the average is a copy of the whole model"),
        ({"early_stopping": {"patience": 2}}, "early_stopping.restore_best: the best epoch's model is a copy"),
        ({"distributed": {"strategy": "fsdp", "shard_modules": ["Block"]}}, "distributed.shard_modules: the model"),
        ({"distributed": {"shard_modules": ["Linear"]}}, "distributed.shard_modules: a setting of strategy 'fsdp'"),
        ({"optimizer": {"name": "sgd", "impl": "fused"}}, "optimizer.impl: torch's fused kernel of this optimizer"),
    ],
)
def test_what_a_sharded_model_cannot_do_is_refused_in_one_line_before_the_run_starts(changes, message):
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        engine.setup(job(run_name="refused", **changes))
    assert not Path("runs/refused").exists()
    assert not torch.distributed.is_initialized()


def test_cuda_graphs_do_not_capture_fsdp():
    trainer = SimpleNamespace(device=torch.device("cuda"), distributed=SimpleNamespace(sharded=True), world_size=1)
    assert "FSDP2's all-gathers and reduce-scatters" in Graphed(trainer, 1).unavailable()


def test_the_memory_report_counts_what_each_process_holds():
    rows = torch.tensor([[600.0, 600.0, 1208.0], [500.0, 500.0, 1008.0]])
    text = memory.report(rows, [1100, 1100, 2208], "fsdp")
    assert text.splitlines() == [
        "memory per process after the first step (fsdp, 2 processes): parameters + gradients + optimizer state; "
        "the whole model's: 1.1 KiB + 1.1 KiB + 2.2 KiB = 4.3 KiB",
        "  rank 0: 600 B + 600 B + 1.2 KiB = 2.4 KiB, 0.55 of the whole",
        "  rank 1: 500 B + 500 B + 1008 B = 2.0 KiB, 0.46 of the whole",
    ]


# --- two processes -------------------------------------------------------------------------------

Jobs = list[tuple[str, dict[str, Any] | None, dict[str, Any]]]


def worker(rank: int, out: Path, jobs: Jobs, ports: list[int]) -> None:
    """One of the run's processes, under torchrun's environment; what each job printed and
    returned (rank 0: the whole final weights, from model.pt) or raised."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS
    for (name, job, options), port in zip(jobs, ports):
        os.environ["MASTER_PORT"] = str(port)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                result = engine.run(job, **options)
            record: dict[str, Any] = {"metrics": result.metrics, "run_dir": result.run_dir}
            if rank == 0 and (result.run_dir / "model.pt").is_file():
                record["weights"] = final_weights(result.run_dir)
        except engine.EngineError as error:
            record = {"error": str(error), "shown": error.shown, "exit_code": error.exit_code}
        record["printed"] = printed.getvalue()
        torch.save(record, out / f"{name}-{rank}.pt")


def in_processes(tmp_path: Path, jobs: Jobs) -> dict[str, list[dict]]:
    out = tmp_path / "results"
    out.mkdir()
    torch.multiprocessing.start_processes(
        worker, args=(out, jobs, free_ports(len(jobs))), nprocs=WORLD, start_method="spawn"
    )
    return {
        name: [torch.load(out / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)] for name, *_ in jobs
    }


PAIR = job(optimizer=ADAM, grad_accumulation=3, checkpoint={"every_steps": 6})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One sharded job in one pair of processes: the check the default run affords (about 10 s)."""
    tmp_path = tmp_path_factory.mktemp("pair")
    return in_processes(tmp_path, [("pair", {**PAIR, "runs_dir": str(tmp_path / "runs"), "run_name": "pair"}, {})])[
        "pair"
    ]


def memory_rows(printed: str) -> list[float]:
    """Each rank's share of the whole model's bytes, from the memory report rank 0 printed."""
    return [float(share) for share in re.findall(r"rank \d: .* = .*, ([\d.]+) of the whole", printed)]


@pytest.mark.slow
def test_two_processes_sharding_the_model_reach_the_weights_of_one(pair):
    assert "error" not in pair[0], pair[0]
    expected = engine.run({**whole(PAIR), "run_name": "one"})
    assert_close(pair[0]["weights"], expected.model.state_dict())
    assert pair[0]["metrics"] == pair[1]["metrics"]
    assert pair[0]["metrics"] == pytest.approx(expected.metrics, rel=1e-5)
    # Each process holds half the parameters, gradients and Adam's state (the target: at most 0.55).
    shares = memory_rows(pair[0]["printed"])
    assert len(shares) == WORLD and all(0.45 <= share <= 0.55 for share in shares), pair[0]["printed"]
    assert pair[1]["printed"] == ""  # rank 0 alone prints
    # Each process wrote its shards into each checkpoint; rank 0 the rest beside them.
    folder = pair[0]["run_dir"] / "checkpoints"
    assert steps(pair[0]["run_dir"]) == [12, 16]
    assert sorted(path.name for path in (folder / "step-000000016.dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.pt",
    ]


# The slow checks, run once in one pair of processes: other optimizers and windows, mixed
# precision, gradient clipping, compile, units by class, a Dataset, and resuming with another
# number of processes both ways.
ONE_TO_TWO = job(optimizer=ADAMW, grad_accumulation=2, checkpoint={"every_steps": 3})
TWO_TO_ONE = job(optimizer=ADAMW, grad_accumulation=2, checkpoint={"every_steps": 3, "async_save": False})
OTHERS = {
    "sgd-1": job(optimizer=SGD),
    "sgd-3": job(optimizer=SGD, grad_accumulation=3),
    "adamw-1": job(optimizer=ADAMW),
    "adamw-3": job(optimizer=ADAMW, grad_accumulation=3),
    "clip": job(optimizer=SGD, grad_clip={"max_norm": 0.3}),
    "units": job(
        optimizer=ADAM, distributed={"strategy": "fsdp", "shard_modules": ["Linear"], "reshard_after_forward": False}
    ),
    "dataset": {**DATASET, **FSDP},
}
MIXED = {"bf16": job(optimizer=ADAMW, precision={"name": "bf16-mixed"}), "fp16": job(precision={"name": "16-mixed"})}
COMPILED = job(epochs=1, optimizer=ADAM, accelerate={"name": "compile"})


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("fsdp")
    runs = {"runs_dir": str(tmp_path / "runs")}
    # 1 -> 2: one process, sharding over itself, fails after step 7 (its last checkpoint: step 6).
    with pytest.raises(engine.TrainingError):
        engine.run({**ONE_TO_TWO, **runs, "run_name": "from-one"}, plugins=[CrashAt(7)])
    jobs: Jobs = [(name, {**each, **runs}, {}) for name, each in {**OTHERS, **MIXED}.items()]
    jobs += [
        ("compile", {**COMPILED, **runs}, {}),
        ("from-one", None, {"resume": str(tmp_path / "runs" / "from-one")}),
        ("from-two", {**TWO_TO_ONE, **runs, "run_name": "from-two"}, {"plugins": [CrashAt(7)]}),
    ]
    results: dict[str, Any] = in_processes(tmp_path, jobs)
    # 2 -> 1: one process continues what two wrote.
    results["to-one"] = engine.run(resume=tmp_path / "runs" / "from-two")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OTHERS))
def test_two_sharding_processes_reach_one_with_other_optimizers_windows_and_settings(two_processes, name):
    expected = engine.run({**whole(OTHERS[name]), "run_name": "one"})
    ranks = two_processes[name]
    assert_close(ranks[0]["weights"], expected.model.state_dict())
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"] == pytest.approx(expected.metrics, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_precision_shards_within_its_tolerance(two_processes, name):
    """FSDP2's policy computes with bf16 (fp16) parameters and reduces float32 gradients; one
    process's autocast casts each weight per forward, and in two each half batch's gradient is
    rounded apart. Its tolerance: well within the difference the format itself makes against
    float32 on the same job (AdamW, whose update does not scale with the gradient, turns roundings
    into steps of the learning rate)."""
    expected = engine.run({**whole(MIXED[name]), "run_name": "one"}).model.state_dict()
    full = engine.run({**whole(MIXED[name]), "precision": {"name": "32"}, "run_name": "full"}).model.state_dict()
    own = max((expected[key] - full[key]).abs().max().item() for key in expected)
    assert_close(two_processes[name][0]["weights"], expected, atol=own / 4)


@pytest.mark.slow
def test_compile_shards(two_processes):
    expected = engine.run({**whole(COMPILED), "run_name": "one"})
    assert "error" not in two_processes["compile"][0], two_processes["compile"][0]
    assert_close(two_processes["compile"][0]["weights"], expected.model.state_dict(), atol=1e-4)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_with_another_number_of_processes(two_processes):
    expected = engine.run({**whole(ONE_TO_TWO), "run_name": "one"})
    one_to_two, two_to_one = two_processes["from-one"][0], two_processes["to-one"]
    assert_close(one_to_two["weights"], expected.model.state_dict())
    assert_close(final_weights(two_to_one.run_dir), expected.model.state_dict())
    for run_dir in (one_to_two["run_dir"], two_to_one.run_dir):
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["resumed_from"] == "checkpoints/step-000000006.dcp"
    assert [line["step"] for line in read_jsonl(two_to_one.run_dir / "metrics.jsonl")] == [4, 8, 12, 16]
