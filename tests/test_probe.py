"""The probe of issue 19, kept as tests: scripted cases in six categories (durable runs, signals,
disk, after-training inputs, forged files, distributed), each run as a user runs the engine (the
real command in a process of its own where signals, locks or disks are at stake; `main` in this
process otherwise), and each held to the promises beside its own expectations:

- the exit code expected; stderr without a traceback or an ``internal error``, and an error in
  one ``error:`` line, the last (`promised`);
- no foreign code runs: every forged file and plugin, run, would write the marker file
  `RAN` (checked after every case);
- no changed run resumes silently: a resume that changes the run is exit 2 and writes nothing;
- no two writers: a second process on a run that one trains is exit 2 and writes nothing.

The default run holds the cheap cases; ``pytest -m slow`` the others. The figures of the closing
note: ``pytest tests/test_probe.py -m "slow or not slow" --collect-only -q`` (one id a case,
its category first).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.cli import main
from tests.conftest import REPO
from tests.helpers import Payload, forged_program

RAN = "FOREIGN_CODE_RAN"  # what forged code writes, in the case's directory, if it ever runs
CLASSIFY = {
    "epochs": 3,
    "seed": 1,
    "data": {"name": "classification", "n_samples": 200, "n_features": 4, "batch_size": 20, "val_fraction": 0.2},
    "model": {"name": "mlp", "hidden": [8]},
    "loss": {"name": "cross_entropy"},
    "checkpoint": {"every_steps": 4},
}
# Long enough to be caught training (about a minute here), for the signal and lock cases.
LONG = {**CLASSIFY, "epochs": 3000, "checkpoint": {"every_seconds": 0.0, "every_epochs": 50}}
WORKERS = {
    **LONG,
    "data": {"name": "tests.helpers:blobs_dataset", "batch_size": 8, "num_workers": 2, "val_fraction": 0.25},
}


def cases(names: list[str], default: set[str], category: str) -> list[object]:
    """`names` as parameters, those outside `default` with the slow tests; ids ``category:name``."""
    return [
        pytest.param(name, id=f"{category}:{name}", marks=() if name in default else pytest.mark.slow) for name in names
    ]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def promised(outcome: Outcome, code: int, message: str = "") -> None:
    """The case's exit code, and stderr as the engine promises it (see the module docstring)."""
    err = outcome.err
    assert outcome.code == code, (outcome.code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    if code in (1, 2):
        assert errors == [err.splitlines()[-1]], err
        assert message in errors[0], err
    else:
        assert errors == [], err
        assert message in err, err


def in_process(*argv: object) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as usage:
            code = usage.code
    return Outcome(code, out.getvalue(), err.getvalue())


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def command(cwd: Path, *argv: object, timeout: float = 300) -> Outcome:
    done = subprocess.run(
        [sys.executable, "-m", "engine", *map(str, argv)],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def started(cwd: Path, *argv: object) -> subprocess.Popen[str]:
    """The command, in a process group of its own (what a scheduler signals)."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine", *map(str, argv)],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finished(process: subprocess.Popen[str], timeout: float = 300) -> Outcome:
    out, err = process.communicate(timeout=timeout)
    return Outcome(process.returncode, out, err)


def training(run_dir: Path, process: subprocess.Popen[str], timeout: float = 240) -> None:
    """Until `process` trains the run: its lock held, its summary "running" and its metrics file
    open (`on_run_start` done)."""
    deadline = time.monotonic() + timeout
    while not (
        engine.runs.held(run_dir)
        and engine.runs.read_summary(run_dir).get("status") == "running"
        and (run_dir / "metrics.jsonl").is_file()
    ):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.1)
    time.sleep(0.5)  # past on_run_start, into the loop


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (the lock file's, too: a second process that
    took the lock would have written its own pid there)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def write_job(cwd: Path, job: dict[str, object], name: str = "job.toml") -> Path:
    (cwd / name).write_text(engine.dump_toml(job))
    return cwd / name


@pytest.fixture(autouse=True)
def no_foreign_code(tmp_path: Path) -> Iterator[None]:
    yield
    assert not (tmp_path / RAN).exists(), "forged code ran"


@pytest.fixture(scope="module")
def classified(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of CLASSIFY, trained once; a case copies it before it changes anything."""
    runs_dir = tmp_path_factory.mktemp("probe")
    return engine.run({**CLASSIFY, "runs_dir": str(runs_dir), "run_name": "classified"}).run_dir


@pytest.fixture
def run_dir(classified: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(classified, tmp_path / "runs" / "classified"))


# --- durable runs: resumes, the lock --------------------------------------------------------------

CHANGES = {
    "model-activation": (["--set", "model.activation=tanh"], "model.activation 'relu' -> 'tanh'"),
    "optimizer": (["--set", "optimizer.lr=0.5"], "optimizer.lr 0.01 -> 0.5"),
    "scheduler": (["--set", "scheduler.name=step"], "scheduler.name 'none' -> 'step'"),
    "data-size": (["--set", "data.n_samples=300"], "data.n_samples 200 -> 300"),
    "batch-size": (["--set", "data.batch_size=40"], "data.batch_size 20 -> 40"),
    "precision": (["--set", "precision.name=bf16-mixed"], "precision.name '32' -> 'bf16-mixed'"),
    "grad-accumulation": (["--set", "grad_accumulation=2"], "grad_accumulation 1 -> 2"),
    "seed": (["--set", "seed=2"], "seed 1 -> 2"),
    "split": (["--set", "data.split_seed=5"], "data.split_seed 0 -> 5"),
}


@pytest.mark.parametrize("change", cases(list(CHANGES), {"model-activation", "batch-size"}, "durable:resume-changed"))
def test_durable_a_changed_resume_is_refused_and_writes_nothing(run_dir: Path, change: str) -> None:
    argv, named = CHANGES[change]
    before = snapshot(run_dir)
    promised(in_process("run", "--resume", run_dir, *argv), 2, named)
    assert snapshot(run_dir) == before


NOTHING = {
    "resume-empty": ["--resume", ""],
    "resume-missing": ["--resume", "runs/none"],
    "resume-auto-unnamed": ["--resume", "auto"],
    "allow-unknown": ["--allow-change", "nope", "--resume", "."],
}


@pytest.mark.parametrize("case", cases(list(NOTHING), {"resume-empty"}, "durable"))
def test_durable_a_resume_of_nothing_is_one_line(tmp_path: Path, case: str) -> None:
    promised(in_process("run", *NOTHING[case]), 2, "")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_durable_an_allowed_change_is_recorded(run_dir: Path) -> None:
    promised(in_process("run", "--resume", run_dir, "--set", "optimizer.lr=0.02", "--allow-change", "optimizer.lr"), 0)
    change = json.loads((run_dir / "summary.json").read_text())["changes"]
    assert change == [{"key": "optimizer.lr", "from": 0.01, "to": 0.02, "step": 24, "override": True}]


@pytest.mark.slow
def test_durable_sigkill_then_resume_ends_the_run_and_the_lock_goes_with_the_process(tmp_path: Path) -> None:
    write_job(tmp_path, {**LONG, "epochs": 60, "run_name": "killed", "checkpoint": {"every_epochs": 5}})
    process = started(tmp_path, "run", "job.toml")
    run = tmp_path / "runs" / "killed"
    training(run, process)
    while not list((run / "checkpoints").glob("step-*.pt")):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not engine.runs.held(run)
    promised(in_process("runs", tmp_path / "runs"), 0)
    assert " crashed " in in_process("runs", tmp_path / "runs").out
    promised(command(tmp_path, "run", "--resume", "runs/killed", "--quiet"), 0)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


SECOND = {
    "resume-while-training": ["run", "--resume", "runs/busy"],  # a resume of a run its process still trains
    "resume-auto-while-training": ["run", "job.toml", "--set", "resume=auto"],  # a scheduler's rerun of the command
    "same-name-while-training": ["run", "job.toml"],  # a new run of the same name
}


@pytest.mark.parametrize("case", cases(list(SECOND), set(), "durable"))
def test_durable_a_second_process_on_a_run_being_trained_is_refused(tmp_path: Path, case: str) -> None:
    second = SECOND[case]
    write_job(tmp_path, {**LONG, "run_name": "busy"})
    first = started(tmp_path, "run", "job.toml")
    run = tmp_path / "runs" / "busy"
    try:
        training(run, first)
        assert " running " in in_process("runs", tmp_path / "runs").out
        lock = (run / ".lock").read_bytes()
        outcome = command(tmp_path, *second)
        expected = "exists: use --resume" if second == ["run", "job.toml"] else f"is in use by pid {first.pid} on "
        promised(outcome, 2, expected)
        assert (run / ".lock").read_bytes() == lock  # the second process never held it
        assert first.poll() is None  # the first trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


@pytest.mark.slow
def test_durable_two_resumes_at_once_one_trains_the_other_is_refused(tmp_path: Path) -> None:
    write_job(tmp_path, {**LONG, "epochs": 10, "run_name": "twice", "checkpoint": {"every_epochs": 10}})
    promised(command(tmp_path, "run", "job.toml", "--quiet"), 0)
    run = tmp_path / "runs" / "twice"
    resumes = [started(tmp_path, "run", "--resume", "runs/twice", "--set", "epochs=3000") for _ in range(2)]
    deadline = time.monotonic() + 240
    while all(process.poll() is None for process in resumes):  # until the one refused has gone
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [refused] = [process for process in resumes if process.poll() is not None]
    [training_it] = [process for process in resumes if process is not refused]
    promised(finished(refused), 2, f"is in use by pid {training_it.pid} on ")
    training(run, training_it)
    os.killpg(training_it.pid, signal.SIGTERM)
    promised(finished(training_it), 143, "interrupted by SIGTERM")
    interrupted_run(run, steps_at_least=10 * 8)


# --- signals: as a scheduler and a terminal send them -------------------------------------------


def interrupted_run(run: Path, steps_at_least: int = 1) -> dict[str, object]:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= steps_at_least
    assert (run / "model.pt").is_file()
    last = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    assert last.name == f"step-{summary['steps']:09d}.pt"  # the checkpoint of where it stopped
    assert engine.runs.load(last, engine.runs.CHECKPOINT_FORMAT)["state"]["step"] == summary["steps"]
    assert not list(run.rglob("*.tmp")) and not engine.runs.held(run)
    return summary


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "code"),
    [("SIGTERM", 143)] * 3 + [("SIGINT", 130)],
    ids=[
        f"signals:{name}-to-the-process-group-with-workers-{trial}" for trial, name in enumerate(["TERM"] * 3 + ["INT"])
    ],
)
def test_signals_to_the_whole_process_group_with_dataloader_workers_stop_the_run_cleanly(
    tmp_path: Path, name: str, code: int
) -> None:
    """What Slurm, systemd and Kubernetes do: the signal reaches the workers as well."""
    write_job(tmp_path, {**WORKERS, "run_name": "group"})
    process = started(tmp_path, "run", "job.toml")
    run = tmp_path / "runs" / "group"
    training(run, process)
    time.sleep(random.Random(str(tmp_path)).uniform(0.0, 1.5))
    os.killpg(process.pid, getattr(signal, name))
    outcome = finished(process)
    promised(outcome, code, f"interrupted by {name} at epoch ")
    interrupted_run(run)
    deadline = time.monotonic() + 10
    with contextlib.suppress(ProcessLookupError):  # no worker is left behind
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.1)
        pytest.fail("a process of the run's group is still there")


CTRL_C_TRIALS = int(os.environ.get("ENGINE_PROBE_CTRL_C", "12"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(CTRL_C_TRIALS), ids=lambda trial: f"signals:ctrl-c-at-start-up-{trial}")
def test_signals_ctrl_c_at_any_moment_of_start_up_is_130_and_one_line(tmp_path: Path, trial: int) -> None:
    draw = random.Random(trial)
    classify = ["--set", "data.name=classification", "--set", "loss.name=cross_entropy"]
    argv = draw.choice([["config"], ["run", "--set", "epochs=100000"], ["config", *classify]])
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", *argv],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(draw.uniform(0.0, 3.0))
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    code = process.returncode
    if code == -signal.SIGINT:  # it came as the interpreter was exiting, killed by it: the shell says 130 too
        assert err in ("", "interrupted\n") and not list(tmp_path.rglob("*.tmp"))
    elif code == 0:  # a dry run that ended first
        assert argv[0] == "config" and err == ""
    elif (tmp_path / "runs").exists() and err.startswith("interrupted by SIGINT"):  # the run had started
        assert code == 130
    else:
        assert (code, err) == (130, "interrupted\n")
        assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_signals_a_second_sigterm_exits_at_once_leaving_every_file_valid(tmp_path: Path) -> None:
    write_job(tmp_path, {**LONG, "run_name": "twice"})
    process = started(tmp_path, "run", "job.toml")
    run = tmp_path / "runs" / "twice"
    training(run, process)
    os.killpg(process.pid, signal.SIGTERM)
    os.killpg(process.pid, signal.SIGTERM)
    outcome = finished(process)
    assert outcome.code == 143 and "Traceback" not in outcome.err
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert json.loads((run / "summary.json").read_text())["status"] in ("running", "interrupted")
    assert not list(run.rglob("*.tmp")) and not engine.runs.held(run)


# --- disk: a small file system that fills up -----------------------------------------------------

# Run inside a private mount namespace (unshare), on a tmpfs of SIZE: prints what the test checks.
ON_A_SMALL_DISK = r"""
import json, os, subprocess, sys
disk, size, case = sys.argv[1], sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], check=True)
def engine(*argv):
    done = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, cwd=disk)
    return {"code": done.returncode, "err": done.stderr}
def fill(keep):
    with open(os.path.join(disk, "fill"), "wb") as handle:
        stat = os.statvfs(disk)
        handle.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - keep))
report = {}
job = ["--set", "run_name=r", "--set", "data.name=classification", "--set", "model.name=mlp",
       "--set", "model.hidden=[64]", "--set", "loss.name=cross_entropy", "--set", "log.every=1"]
if case == "fills-while-training":
    report["run"] = engine("run", *job, "--set", "epochs=500", "--set", "checkpoint.every_steps=1",
                           "--set", "checkpoint.keep_last=1000", "--quiet")
elif case == "full-at-start":
    fill(16 * 1024)
    report["run"] = engine("run", *job, "--set", "epochs=3", "--quiet")
elif case == "export":
    report["train"] = engine("run", *job, "--set", "epochs=2", "--quiet")
    fill(8 * 1024)
    report["run"] = engine("export", "runs/r", "--format", "exported")
elif case == "metrics":  # no checkpoint but the last: what fills the disk is metrics.jsonl
    report["run"] = engine("run", "--set", "run_name=r", "--set", "epochs=100000", "--set", "log.every=1",
                           "--set", "checkpoint.every_seconds=0", "--quiet")
elif case == "resume":
    report["train"] = engine("run", *job, "--set", "epochs=2", "--quiet")
    fill(16 * 1024)
    report["run"] = engine("run", "--resume", "runs/r", "--set", "epochs=4", "--quiet")
elif case == "evaluate":
    report["train"] = engine("run", *job, "--set", "epochs=2", "--quiet")
    import numpy as np
    np.savez(os.path.join(disk, "x.npz"), x=np.random.randn(10, 20).astype("float32"), y=np.arange(10) % 4)
    fill(0)
    report["run"] = engine("evaluate", "runs/r", "--data", "x.npz", "--backend", "eager")
elif case == "predict":
    report["train"] = engine("run", *job, "--set", "epochs=2", "--quiet")
    import numpy as np
    np.savez(os.path.join(disk, "x.npz"), x=np.random.randn(20000, 20).astype("float32"))
    fill(4 * 1024)
    report["run"] = engine("predict", "runs/r", "--data", "x.npz", "--out", "p.csv", "--backend", "eager")
run = os.path.join(disk, "runs", "r")
report["exists"] = os.path.isdir(run)
if report["exists"]:
    report["files"] = sorted(os.path.relpath(os.path.join(root, name), run)
                             for root, _, names in os.walk(run) for name in names)
    with open(os.path.join(run, "summary.json")) as handle:
        report["summary"] = json.load(handle)
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        report["metrics"] = [json.loads(line) for line in handle.read().splitlines()]
if case == "fills-while-training":
    os.remove(os.path.join(disk, "fill")) if os.path.exists(os.path.join(disk, "fill")) else None
    for name in sorted(os.listdir(os.path.join(run, "checkpoints")))[:-2]:
        os.remove(os.path.join(run, "checkpoints", name))  # space for the resume
    report["resumed"] = engine("run", "--resume", "runs/r", "--set", "checkpoint.keep_last=2", "--quiet")
    with open(os.path.join(run, "summary.json")) as handle:
        report["resumed_summary"] = json.load(handle)
print(json.dumps(report))
"""


def on_a_small_disk(tmp_path: Path, case: str, size: str) -> dict[str, object]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    script = tmp_path / "disk.py"
    script.write_text(ON_A_SMALL_DISK)
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, str(script), str(disk), size, case],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode and "mount" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_disk_a_run_that_fills_the_disk_ends_failed_with_valid_files_and_resumes_once_freed(tmp_path: Path) -> None:
    report = on_a_small_disk(tmp_path, "fills-while-training", "2m")
    promised(Outcome(report["run"]["code"], "", report["run"]["err"]), 1, "No space left on device")
    summary = report["summary"]
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert [line["epoch"] for line in report["metrics"]] == list(range(1, len(report["metrics"]) + 1))
    assert not [name for name in report["files"] if name.endswith(".tmp")] and ".reserve" not in report["files"]
    promised(Outcome(report["resumed"]["code"], "", report["resumed"]["err"]), 0)
    assert report["resumed_summary"]["status"] == "completed"


@pytest.mark.slow
def test_disk_a_run_that_cannot_start_leaves_no_directory(tmp_path: Path) -> None:
    report = on_a_small_disk(tmp_path, "full-at-start", "1m")
    promised(Outcome(report["run"]["code"], "", report["run"]["err"]), 1, "cannot start the run in ")
    assert report["exists"] is False  # its name is free for the next attempt


@pytest.mark.slow
def test_disk_metrics_that_fill_the_disk_stay_whole_lines_and_the_summary_says_why(tmp_path: Path) -> None:
    report = on_a_small_disk(tmp_path, "metrics", "200k")
    promised(Outcome(report["run"]["code"], "", report["run"]["err"]), 1, "No space left on device")
    assert report["summary"]["status"] == "failed" and "metrics.jsonl" in report["summary"]["error"]
    assert [line["epoch"] for line in report["metrics"]] == list(range(1, len(report["metrics"]) + 1))


@pytest.mark.slow
def test_disk_a_resume_on_a_full_disk_fails_in_one_line_and_keeps_the_run(tmp_path: Path) -> None:
    report = on_a_small_disk(tmp_path, "resume", "2m")
    promised(Outcome(report["train"]["code"], "", report["train"]["err"]), 0)
    promised(Outcome(report["run"]["code"], "", report["run"]["err"]), 1, "cannot start the run in ")
    assert report["summary"]["status"] in ("completed", "failed")  # the last one it could write, whole
    assert "checkpoints/step-000000002.pt" in report["files"] and "model.pt" in report["files"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["export", "predict", "evaluate"],
    ids=["disk:export-on-a-full-disk", "disk:predict-on-a-full-disk", "disk:evaluate-on-a-full-disk"],
)
def test_disk_after_training_commands_on_a_full_disk_fail_in_one_line(tmp_path: Path, case: str) -> None:
    report = on_a_small_disk(tmp_path, case, "2m")
    promised(Outcome(report["train"]["code"], "", report["train"]["err"]), 0)
    promised(Outcome(report["run"]["code"], "", report["run"]["err"]), 1, "No space left on device")  # not -6
    assert not [name for name in report["files"] if ".tmp" in name or name.startswith("exports/.")]


# --- after training: what the commands are given -------------------------------------------------

INPUTS: dict[str, tuple[list[object], int, str]] = {
    "out-is-a-folder": (["predict", "{run}", "--data", "x.npz", "--out", "folder"], 2, "is a folder"),
    "out-in-a-missing-folder": (["predict", "{run}", "--data", "x.npz", "--out", "no/p.csv"], 2, "does not exist"),
    "out-unwritable": (["predict", "{run}", "--data", "x.npz", "--out", "/proc/p.csv"], 2, "cannot write in"),
    "batch-size-0": (["predict", "{run}", "--data", "x.npz", "--out", "p.csv", "--batch-size", "0"], 2, "--batch-size"),
    "batch-size-negative": (
        ["predict", "{run}", "--data", "x.npz", "--out", "p.csv", "--batch-size", "-1"],
        2,
        "got -1",
    ),
    "no-samples": (["predict", "{run}", "--data", "empty.npz", "--out", "p.csv"], 2, "holds no samples"),
    "nan-inputs": (["predict", "{run}", "--data", "nan.npz", "--out", "p.csv"], 2, "row 1 (counting from 0)"),
    "nan-inputs-passed": (
        ["predict", "{run}", "--data", "nan.npz", "--out", "p.csv", "--pass-non-finite", "--backend", "eager"],
        0,
        "",
    ),
    "nan-evaluated": (["evaluate", "{run}", "--data", "nan.npz", "--backend", "eager"], 2, "not finite"),
    "wrong-width": (["predict", "{run}", "--data", "narrow.npz", "--out", "p.csv"], 2, "features per sample"),
    "which-bogus": (["evaluate", "{run}", "--data", "x.npz", "--which", "bogus"], 2, "which: expected one of"),
    "which-best": (["evaluate", "{run}", "--data", "x.npz", "--which", "best", "--backend", "eager"], 0, ""),
    "unknown-backend": (["predict", "{run}", "--data", "x.npz", "--out", "p.csv", "--backend", "tpu"], 2, "unknown"),
    "export-out-folder": (["export", "{run}", "--format", "exported", "--out", "folder"], 2, "is a folder"),
    "export-out-missing": (["export", "{run}", "--format", "exported", "--out", "no/m.pt2"], 2, "does not exist"),
    "export-out-unwritable": (["export", "{run}", "--format", "exported", "--out", "/proc/m.pt2"], 2, "cannot write"),
    "export-unknown-setting": (["export", "{run}", "--format", "onnx", "--set", "export.opst=3"], 2, "export.opst"),
    "data-missing": (["evaluate", "{run}", "--data", "none.npz"], 2, "does not exist"),
    "data-suffix": (["evaluate", "{run}", "--data", "notes.txt"], 2, "no data component reads .txt"),
    "deep-toml": (["config", "deep.toml"], 2, "nests arrays or tables too deeply"),
}


def input_files(folder: Path) -> None:
    rng = np.random.RandomState(0)
    np.savez(folder / "x.npz", x=rng.randn(10, 4).astype(np.float32), y=rng.randint(0, 3, 10))
    np.savez(folder / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    nan = rng.randn(10, 4).astype(np.float32)
    nan[1, 2] = np.nan
    np.savez(folder / "nan.npz", x=nan, y=rng.randint(0, 3, 10))
    np.savez(folder / "narrow.npz", x=rng.randn(10, 3).astype(np.float32))
    (folder / "folder").mkdir()
    (folder / "notes.txt").write_text("1 2\n")
    (folder / "deep.toml").write_text("epochs = " + "[" * 3000 + "]" * 3000 + "\n")


@pytest.mark.parametrize("case", cases(list(INPUTS), {"out-is-a-folder", "batch-size-0", "nan-inputs"}, "inputs"))
def test_inputs_after_training_commands_take_what_they_are_given_in_one_line(
    run_dir: Path, tmp_path: Path, case: str
) -> None:
    argv, code, message = INPUTS[case]
    input_files(tmp_path)
    promised(in_process(*(str(arg).format(run=run_dir) for arg in argv)), code, message)
    if code == 2:
        assert not Path("p.csv").exists() and not Path("no").exists() and not Path("m.pt2").exists()


@pytest.mark.slow
def test_inputs_an_onnx_opset_the_exporter_cannot_write_is_refused(run_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    promised(in_process("export", run_dir, "--format", "onnx", "--set", "export.opset=3"), 2, "export.opset: 3")


# --- forged files: a run directory from elsewhere --------------------------------------------------

CANARY_PLUGIN = """
from pathlib import Path

import engine

Path({marker!r}).write_text("ran")


@engine.hookimpl
def on_log(metrics):
    pass
"""
CANARY_MODULE = """
from pathlib import Path

import torch

Path({marker!r}).write_text("ran")


def model(info):
    return torch.nn.Linear(info.n_features, info.n_outputs)
"""


def forged_config(run: Path, tmp_path: Path, how: str) -> None:
    """The run's config.toml made to name code that writes the marker when imported."""
    marker = str(tmp_path / RAN)
    config = run / "config.toml"
    text = config.read_text()
    if how == "plugin-file":
        (tmp_path / "evil.py").write_text(CANARY_PLUGIN.format(marker=marker))
        text = text.replace("plugins = []", f"plugins = [{json.dumps(str(tmp_path / 'evil.py'))}]")
    elif how == "plugin-module":
        (tmp_path / "evil_module.py").write_text(CANARY_PLUGIN.format(marker=marker))
        text = text.replace("plugins = []", 'plugins = ["evil_module"]')
    elif how == "component":
        (tmp_path / "evil_components.py").write_text(CANARY_MODULE.format(marker=marker))
        text = text.replace('name = "mlp"', 'name = "evil_components:model"')
    else:  # the input transform the model is built behind
        (tmp_path / "evil_components.py").write_text(CANARY_MODULE.format(marker=marker))
        text = text.replace('input_transform = ""', 'input_transform = "evil_components:model"')
    assert text != config.read_text()
    config.write_text(text)


OPENINGS = {
    "load": None,
    "evaluate": ["evaluate", "{run}", "--data", "x.npz"],
    "predict": ["predict", "{run}", "--data", "x.npz", "--out", "p.csv"],
    "export": ["export", "{run}", "--format", "exported"],
    "resume": ["run", "--resume", "{run}"],
}


FORGERIES = [
    f"{how}-{opening}"
    for how in ("plugin-file", "plugin-module", "component", "input-transform")
    for opening in OPENINGS
]


@pytest.mark.parametrize("case", cases(FORGERIES, {"plugin-file-predict", "component-resume"}, "forged:config-names"))
def test_forged_a_config_that_names_code_is_refused_by_every_opening(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    how, opening = case.rsplit("-", 1)
    monkeypatch.syspath_prepend(str(tmp_path))  # where the forger put its modules: importable
    forged_config(run_dir, tmp_path, how)
    input_files(tmp_path)
    before = snapshot(run_dir)
    if OPENINGS[opening] is None:
        with pytest.raises(engine.ConfigError, match="names code that opening it would import"):
            engine.load(run_dir)
    else:
        argv = [str(arg).format(run=run_dir) for arg in OPENINGS[opening]]
        promised(in_process(*argv), 2, "names code that opening it would import")
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_forged_pickles_in_model_pt_and_a_checkpoint_never_run(run_dir: Path, tmp_path: Path) -> None:
    marker = str(tmp_path / RAN)
    with open(run_dir / "model.pt", "wb") as handle:
        pickle.dump({"format": engine.runs.MODEL_FORMAT, "model": Payload(marker)}, handle)
    with pytest.raises(engine.ConfigError, match=r"model.pt' is not a readable engine.model/2 file"):
        engine.load(run_dir)
    last = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    torch.save({"format": engine.runs.CHECKPOINT_FORMAT, "state": Payload(marker)}, last)
    promised(in_process("run", "--resume", run_dir, "--set", "epochs=5"), 2, "is not a readable engine.checkpoint/3")


def rerecorded(path: Path) -> None:
    """The export's record rewritten to vouch for the file as it is now (what a forger can do)."""
    record_file = path.with_name(path.name + ".json")
    record = json.loads(record_file.read_text())
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))


@pytest.mark.parametrize("case", cases(["untrusted", "trusted"], {"trusted"}, "forged:pt2-pickle"))
def test_forged_a_program_with_a_pickled_payload_never_runs(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    trusted = case == "trusted"
    from engine_plugins import inference

    written = inference.export(run_dir, "exported")
    forged_program(written.path, written.path, tmp_path / RAN)
    rerecorded(written.path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "receiver"))  # not verified on this machine
    input_files(tmp_path)
    argv = ["predict", run_dir, "--data", "x.npz", "--out", "p.csv", "--backend", "exported"]
    if trusted:  # loaded, with torch.load held to weights only
        promised(in_process(*argv, "--trust-run"), 2, "cannot be loaded: UnpicklingError: Weights only load failed")
    else:  # not loaded at all: exported again from the run's weights
        promised(in_process(*argv), 0, "its export may run code and the run is not trusted")


@pytest.mark.slow  # an AOTInductor compile and a C compiler
def test_forged_an_aoti_package_whose_library_was_replaced_never_runs(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_plugins import inference

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler")
    written = inference.export(run_dir, "aoti")
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void ran(void) "
        f'{{ FILE *f = fopen("{tmp_path / RAN}", "w"); if (f) fclose(f); }}\n'
    )
    library = tmp_path / "evil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    with zipfile.ZipFile(written.path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for name in [name for name in members if name.endswith(".so")]:
        members[name] = library.read_bytes()
    with zipfile.ZipFile(written.path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    input_files(tmp_path)
    argv = ["predict", run_dir, "--data", "x.npz", "--out", "p.csv", "--backend", "aoti"]
    promised(in_process(*argv), 0, "is not the file its record verified")  # its record untouched
    with zipfile.ZipFile(written.path, "w") as archive:  # again, with the record forged to match
        for name, data in members.items():
            archive.writestr(name, data)
    rerecorded(written.path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "receiver"))  # a machine that never verified it
    promised(in_process(*argv), 0, "its export may run code and the run is not trusted")


@pytest.mark.slow  # two ONNX exports
def test_forged_an_onnx_file_swapped_for_another_runs_is_not_used(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from engine_plugins import inference

    written = inference.export(run_dir, "onnx")
    other = engine.run({"epochs": 2, "run_name": "other", "runs_dir": str(tmp_path / "others")}).run_dir
    shutil.copy(inference.export(other, "onnx").path, written.path)  # its record untouched
    backend = inference.load_backend(run_dir, backend="onnx")
    assert "is not the file its record verified" in backend.description
    x = torch.randn(5, 4)
    torch.testing.assert_close(backend(x), engine.load(run_dir)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "how",
    cases(
        ["symlink-metrics", "symlink-checkpoints", "ranking-outside", "best-json-outside"],
        {"symlink-metrics"},
        "forged",
    ),
)
def test_forged_paths_out_of_the_run_are_never_followed(run_dir: Path, tmp_path: Path, how: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "best-000000099.pt").write_text("precious\n")
    (victim / "notes.txt").write_text("precious\n")
    if how == "symlink-metrics":
        (run_dir / "metrics.jsonl").unlink()
        (run_dir / "metrics.jsonl").symlink_to(victim / "notes.txt")
        code, message = 1, "metrics.jsonl' is a link"
    elif how == "symlink-checkpoints":
        shutil.copy(sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1], tmp_path / "last.pt")
        shutil.rmtree(run_dir / "checkpoints")
        (run_dir / "checkpoints").symlink_to(victim)
        (victim / "step-000000024.pt").write_bytes((tmp_path / "last.pt").read_bytes())
        code, message = 2, "is outside run"
    elif how == "ranking-outside":
        last = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
        saved = engine.runs.load(last, engine.runs.CHECKPOINT_FORMAT)
        saved["plugins"]["checkpoint"]["best"][0]["file"] = "../../../victim/best-000000099.pt"
        engine.runs.save(saved, last)
        code, message = 2, "which is not a best checkpoint's file name"
    else:
        ranking = run_dir / "checkpoints" / "best.json"
        ranking.write_text(ranking.read_text().replace('"file": "best-', '"file": "../../../victim/best-'))
        code, message = 2, "which is not a best checkpoint's file name"
    argv = ["evaluate", run_dir, "--data", "x.npz", "--which", "best"] if how == "best-json-outside" else None
    input_files(tmp_path)
    outcome = in_process(*(argv or ["run", "--resume", run_dir, "--set", "epochs=6"]))
    promised(outcome, code, message)
    assert (
        sorted(path.read_text() for path in victim.iterdir() if path.suffix != ".pt" or "best" in path.name)
        == ["precious\n"] * 2
    )


@pytest.mark.slow
def test_forged_a_standard_library_callable_re_exported_elsewhere_is_no_component(tmp_path: Path) -> None:
    popen = "torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler:Popen"
    touch = json.dumps(["touch", str(tmp_path / RAN)])
    for kind in ("model", "distributed"):
        job = write_job(tmp_path, {kind: {"name": popen, "args": json.loads(touch)}}, f"{kind}.toml")
        promised(in_process("config", job), 2, "of the standard library")


# --- distributed: a run over several processes -------------------------------------------------


@pytest.mark.slow
def test_distributed_a_changed_resume_over_two_processes_is_refused_once(tmp_path: Path) -> None:
    write_job(tmp_path, {**CLASSIFY, "run_name": "ddp"})
    promised(command(tmp_path, "run", "job.toml", "--nproc", "2", "--quiet"), 0)
    outcome = command(tmp_path, "run", "--resume", "runs/ddp", "--nproc", "2", "--set", "optimizer.lr=0.5")
    promised(outcome, 2, "optimizer.lr 0.01 -> 0.5")  # one line, though two processes refused it
    assert not engine.runs.held(tmp_path / "runs" / "ddp")


@pytest.mark.slow
def test_distributed_a_second_run_on_a_run_two_processes_train_is_refused(tmp_path: Path) -> None:
    write_job(tmp_path, {**LONG, "run_name": "ddp"})
    first = started(tmp_path, "run", "job.toml", "--nproc", "2")
    run = tmp_path / "runs" / "ddp"
    try:
        training(run, first)
        promised(command(tmp_path, "run", "--resume", "runs/ddp", "--nproc", "2"), 2, "is in use by pid")
        promised(command(tmp_path, "run", "--resume", "runs/ddp"), 2, "is in use by pid")
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        outcome = finished(first)
    promised(outcome, 143, "interrupted by SIGTERM")
    interrupted_run(run)


@pytest.mark.slow
def test_distributed_a_run_of_two_processes_resumes_in_one_and_in_two(tmp_path: Path) -> None:
    """The number of processes is not the run's course (the batch is global): no change to refuse."""
    write_job(tmp_path, {**CLASSIFY, "run_name": "ddp"})
    promised(command(tmp_path, "run", "job.toml", "--nproc", "2", "--quiet"), 0)
    promised(command(tmp_path, "run", "--resume", "runs/ddp", "--set", "epochs=4", "--quiet"), 0)
    promised(command(tmp_path, "run", "--resume", "runs/ddp", "--set", "epochs=5", "--nproc", "2", "--quiet"), 0)
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 5 * 8
    assert [change["key"] for change in summary["changes"]] == ["epochs", "epochs"]


@pytest.mark.slow
def test_distributed_a_forged_config_is_refused_in_one_line_by_every_process(tmp_path: Path) -> None:
    write_job(tmp_path, {**CLASSIFY, "run_name": "ddp"})
    promised(command(tmp_path, "run", "job.toml", "--quiet"), 0)
    forged_config(tmp_path / "runs" / "ddp", tmp_path, "plugin-file")
    promised(command(tmp_path, "run", "--resume", "runs/ddp", "--nproc", "2"), 2, "names code that opening it")


@pytest.mark.slow
def test_distributed_sigterm_to_the_launchers_process_group_stops_every_process_cleanly(tmp_path: Path) -> None:
    write_job(tmp_path, {**WORKERS, "run_name": "ddp"})
    process = started(tmp_path, "run", "job.toml", "--nproc", "2")
    run = tmp_path / "runs" / "ddp"
    training(run, process)
    os.killpg(process.pid, signal.SIGTERM)
    promised(finished(process), 143, "interrupted by SIGTERM")
    interrupted_run(run)
