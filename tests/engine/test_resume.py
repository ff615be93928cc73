"""Exact resume: a run killed with SIGKILL at a random step and resumed from its latest checkpoint
ends with the weights (bit for bit) and metrics.jsonl (apart from wall-clock columns) of the run
that was never interrupted.

Each case runs in subprocesses through the CLI, as a user would: the uninterrupted run, the run
killed by a plugin at a step drawn from a seeded generator, and `--resume`. Set
ENGINE_RESUME_KILLS=N to try N kill points per case (CI tries one). The default run keeps one case of
each kind (a kill, a signal); the others are marked slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import engine
from engine.steps import clock_of, run_length
from tests.conftest import REPO

KILLS = int(os.environ.get("ENGINE_RESUME_KILLS", "1"))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Sends itself a signal after step $KILL_AT ($KILL_SIGNAL, SIGKILL by default), $KILL_DELAY
# seconds later; a no-op without it, so the resumed run (whose config.toml records this plugin)
# trains on. Checkpoints are written in the background: the delay lets the latest one reach the
# disk, as it has in all but a kill within milliseconds of it (tested apart, with no delay).
KILLER = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state):
    if state.step == int(os.environ.get("KILL_AT", 0)):
        time.sleep(float(os.environ.get("KILL_DELAY", "0.2")))
        for name in os.environ.get("KILL_SIGNAL", "SIGKILL").split(","):
            os.kill(os.getpid(), getattr(signal, name))
"""

TUTORIAL = {"epochs": 40, "checkpoint": {"every_steps": 6}, "log": {"every": 5}}
MLP = {
    "epochs": 3,
    "seed": 3,
    "grad_accumulation": 3,  # 8 batches an epoch: windows of 3, 3 and a short one of 2
    "data": {"name": "classification", "n_samples": 300, "n_features": 8, "batch_size": 32, "val_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [16], "dropout": 0.2},
    "loss": {"name": "cross_entropy"},
    "scheduler": {"name": "warmup_cosine", "warmup_steps": 5},
    "grad_clip": {"max_norm": 0.5},
    "log": {"every": 1},
    "checkpoint": {"every_steps": 5},
}
DATASET = {
    "epochs": 3,
    "data": {"name": "tests.helpers:blobs_dataset", "batch_size": 16, "num_workers": 2, "val_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [8], "dropout": 0.3},
    "loss": {"name": "cross_entropy"},
    "log": {"every": 1},
    "checkpoint": {"every_steps": 4},
}
COMPILED = {
    "epochs": 4,
    "data": {"name": "classification", "n_samples": 100, "n_features": 4, "batch_size": 32},
    "model": {"name": "mlp", "hidden": [8]},
    "loss": {"name": "cross_entropy"},
    "accelerate": {"name": "compile"},
    "log": {"every": 1},
    "checkpoint": {"every_steps": 3},
}
BF16 = {**MLP, "precision": {"name": "bf16-mixed"}}
# Crops and flips drawn on the device for each training batch, and dropout: the RNG a checkpoint keeps.
AUGMENTED = {
    "epochs": 3,
    "data": {"name": "tests.helpers:bar_images", "n_samples": 60, "batch_size": 16, "val_fraction": 0.2},
    "model": {"name": "cnn", "channels": [4], "hidden": [8], "dropout": 0.2},
    "loss": {"name": "cross_entropy"},
    "augment": {"crop_padding": 1, "flip": True},
    "log": {"every": 1},
    "checkpoint": {"every_steps": 4},
}

# Counted in optimizer steps (3 an epoch): 10 end within the 4th epoch, validation and logging
# points fall within epochs and at their ends.
STEPS = {
    **{key: value for key, value in MLP.items() if key != "epochs"},
    "max_steps": 10,
    "val_every": 0,
    "val_every_steps": 4,
    "log": {"every_steps": 3},
    "scheduler": {"name": "cosine"},
}


def toml(job: dict[str, Any]) -> str:
    return engine.dump_toml(job)


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("KILL_")}
    environment = {**inherited, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "engine", "run", *args], cwd=cwd, env=environment, capture_output=True, text=True
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "time"} for line in lines]


def assert_same_run(expected: Path, resumed: Path) -> None:
    a, b = weights(expected), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert metrics(resumed) == metrics(expected)
    assert not list(resumed.rglob("*.tmp")), "a temporary file was left behind"
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"].startswith("checkpoints/step-")


def uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> None:
    """job.toml run as `runs/whole` in this process, to save a start-up: the same code, seeds and files."""
    monkeypatch.syspath_prepend(str(REPO))
    engine.run(tmp_path / "job.toml", overrides=["run_name=whole", f"runs_dir={tmp_path / 'runs'}", *overrides])


def batches_of(job: dict[str, Any]) -> int:
    """Batches per epoch."""
    data = job.get("data", {})
    n = data.get("n_samples", 100 if "name" not in data else 96)
    n -= int(n * data.get("val_fraction", 0))
    size = data.get("batch_size", 0) or n
    return -(-n // size)


def total_batches(job: dict[str, Any]) -> int:
    """The train steps (batches) of the whole run."""
    batches = batches_of(job)
    clock = clock_of([1.0] * batches, batches, job.get("grad_accumulation", 1))
    return run_length(clock, job.get("epochs"), job.get("max_steps")).batches


def first_checkpoint(job: dict[str, Any]) -> int:
    """The step of the first checkpoint `every_steps` takes: at the end of the window it falls in."""
    batches = batches_of(job)
    windows = engine.windows([1.0] * batches, job.get("grad_accumulation", 1))
    step = job["checkpoint"]["every_steps"]
    while not windows[(step - 1) % batches].last:
        step += 1
    return step


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(TUTORIAL, id="tutorial", marks=pytest.mark.slow),
        pytest.param(MLP, id="mlp-dropout-schedule-clip-accumulation"),
        pytest.param(STEPS, id="max-steps-points-within-epochs", marks=pytest.mark.slow),
        pytest.param(DATASET, id="dataset-dataloader-2-workers", marks=pytest.mark.slow),
        pytest.param(COMPILED, id="compile", marks=pytest.mark.slow),
        pytest.param(BF16, id="bf16-mixed", marks=pytest.mark.slow),
        pytest.param(AUGMENTED, id="cnn-augmented", marks=pytest.mark.slow),
        pytest.param({**MLP, "device": "cuda"}, id="cuda-mlp", marks=[pytest.mark.cuda, cuda]),
        pytest.param({**COMPILED, "device": "cuda"}, id="cuda-compile", marks=[pytest.mark.cuda, cuda]),
        pytest.param(
            {**MLP, "device": "cuda", "accelerate": {"name": "cudagraph"}},
            id="cuda-graphs",
            marks=[pytest.mark.cuda, cuda],
        ),
    ],
)
def test_a_run_killed_at_a_random_step_resumes_exactly(case, tmp_path, request, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "job.toml").write_text(toml({**case, "plugins": ["killer.py"]}))
    if "accelerate" in case:  # a fresh process: Dynamo's cache would hold another test's graphs
        whole = cli(tmp_path, "job.toml", "--set", "run_name=whole")
        assert whole.returncode == 0, whole.stderr
    else:
        uninterrupted(tmp_path, monkeypatch)
    draw = random.Random(request.node.callspec.id)
    # The plugin's after_step runs before the checkpoint plugin's: a kill at a checkpoint's step comes first.
    after_first_checkpoint = range(first_checkpoint(case) + 1, total_batches(case))
    for attempt, kill_at in enumerate(draw.sample(after_first_checkpoint, KILLS)):
        name = f"killed-{attempt}"
        killed = cli(tmp_path, "job.toml", "--set", f"run_name={name}", KILL_AT=str(kill_at))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        run_dir = tmp_path / "runs" / name
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # what SIGKILL leaves
        if "accelerate" in case:  # a fresh process again
            resumed = cli(tmp_path, "--resume", str(run_dir), "--trust-run")  # its job's plugin is ours
            assert resumed.returncode == 0, resumed.stderr
        else:  # `--resume` is this call: setup(resume=...).fit()
            engine.run(resume=run_dir, trust=True)
        assert_same_run(tmp_path / "runs" / "whole", run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)])
def test_a_signal_ends_the_window_writes_a_checkpoint_and_an_interrupted_summary(name, code, tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    job = {**MLP, "plugins": ["killer.py"], "checkpoint": {"every_seconds": 0.0}}  # only the interruption's
    (tmp_path / "job.toml").write_text(toml(job))
    # Step 13 is the 5th batch of epoch 2: its window (batches 4 to 6) ends at step 14.
    stopped = cli(tmp_path, "job.toml", "--set", "run_name=stopped", KILL_AT="13", KILL_SIGNAL=name)
    assert stopped.returncode == code
    assert stopped.stderr.splitlines()[-1] == (
        f"interrupted by {name} at epoch 2, step 14; continue with: python -m engine run --resume runs/stopped "
        "--trust-run"  # its config names a plugin file
    )
    run_dir = tmp_path / "runs" / "stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 14
    assert sorted((run_dir / "checkpoints").glob("step-*"))[-1].name == "step-000000014.pt"
    assert (run_dir / "model.pt").is_file()  # an interrupted run keeps its weights too
    if name == "SIGTERM":  # the same checkpoint either way: resuming one of them is enough
        uninterrupted(tmp_path, monkeypatch)
        monkeypatch.chdir(tmp_path)  # the job's plugin file, as `--resume` from there finds it
        engine.run(resume=run_dir, trust=True)  # what `--resume` calls (its command line: the second-signal test)
        assert_same_run(tmp_path / "runs" / "whole", run_dir)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_leaving_every_file_valid(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    job = {**TUTORIAL, "plugins": ["killer.py"]}
    (tmp_path / "job.toml").write_text(toml(job))
    stopped = cli(tmp_path, "job.toml", "--set", "run_name=twice", KILL_AT="9", KILL_SIGNAL="SIGTERM,SIGTERM")
    assert stopped.returncode == 143
    run_dir = tmp_path / "runs" / "twice"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # it had no time to say more
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert not list(run_dir.rglob("*.tmp"))
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step-*"))] == ["step-000000006.pt"]
    assert engine.runs.load(run_dir / "checkpoints" / "step-000000006.pt", engine.runs.CHECKPOINT_FORMAT)
    resumed = cli(tmp_path, "--resume", "runs/twice", "--plugin", "killer.py")  # its plugin, given again
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_loses_at_most_that_checkpoint(tmp_path, monkeypatch):
    """Killed right after its first checkpoint was taken, the run finds it on disk or not: resumed
    with `resume = "auto"`, it continues from it or starts again, and ends the same either way."""
    (tmp_path / "killer.py").write_text(KILLER)
    job = {**MLP, "plugins": ["killer.py"], "run_name": "hasty", "resume": "auto"}
    (tmp_path / "job.toml").write_text(toml(job))
    # MLP's first checkpoint is taken at step 6 (the window step 5 falls in ends there).
    killed = cli(tmp_path, "job.toml", KILL_AT=str(first_checkpoint(MLP) + 1), KILL_DELAY="0")
    assert killed.returncode == -signal.SIGKILL
    monkeypatch.syspath_prepend(str(REPO))
    engine.run(tmp_path / "job.toml", overrides=[f"runs_dir={tmp_path / 'runs'}"])  # the same job again
    uninterrupted(tmp_path, monkeypatch, 'resume=""')
    expected, run_dir = tmp_path / "runs" / "whole", tmp_path / "runs" / "hasty"
    assert metrics(run_dir) == metrics(expected)
    assert all(torch.equal(a, b) for a, b in zip(weights(expected).values(), weights(run_dir).values()))
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow  # in one process: tests/engine/test_trainer.py
def test_resume_auto_starts_a_run_then_continues_it(tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    job = {**TUTORIAL, "plugins": ["killer.py"], "run_name": "preemptible", "resume": "auto"}
    (tmp_path / "job.toml").write_text(toml(job))
    first = cli(tmp_path, "job.toml", KILL_AT="20")
    assert first.returncode == -signal.SIGKILL
    second = cli(tmp_path, "job.toml")  # the same command, as a scheduler would rerun it
    assert second.returncode == 0, second.stderr
    summary = json.loads((tmp_path / "runs" / "preemptible" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == "checkpoints/step-000000018.pt"
    uninterrupted(tmp_path, monkeypatch, 'resume=""')
    assert_same_run(tmp_path / "runs" / "whole", tmp_path / "runs" / "preemptible")
