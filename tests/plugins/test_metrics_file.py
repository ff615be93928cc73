"""plugins/metrics_file.py: metrics.jsonl, a JSON line per logging point that a fault or a resume
leaves whole, and `python -m engine runs`, the table of a folder of runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from engine_plugins.metrics_file.table import METRICS, runs_table

import engine
from engine.cli import main
from tests.helpers import job, read_json, read_jsonl

CLASSES = {"name": "classification", "n_samples": 60, "batch_size": 20, "val_fraction": 0.25}


def test_a_line_per_logging_point_with_every_metric_and_the_time():
    result = engine.run(
        job(
            epochs=7,
            log={"every": 3},
            data=CLASSES,
            model={"name": "mlp", "hidden": [4]},
            loss={"name": "cross_entropy"},
        )
    )
    logged = read_jsonl(result.run_dir / METRICS)
    assert [line["epoch"] for line in logged] == [3, 6, 7]
    assert [line["step"] for line in logged] == [9, 18, 21]  # 45 training samples: 3 batches an epoch
    assert set(logged[0]) == {
        "epoch",
        "step",
        "loss",
        "cross_entropy",
        "train_accuracy",
        "lr",
        "val_loss",
        "val_cross_entropy",
        "val_accuracy",
        "val_precision",
        "val_recall",
        "val_f1",
        "val_auroc",
        "time",
    }
    assert {key: value for key, value in logged[-1].items() if key != "time"} == result.metrics
    assert 0 < logged[0]["time"] < logged[1]["time"] < logged[2]["time"]


def test_metrics_lines_are_flushed_as_they_are_logged():
    class Peek:
        def __init__(self) -> None:
            self.seen: list[int] = []

        @engine.hookimpl
        def on_epoch_end(self, state, trainer):
            path = Path(trainer.run_dir) / METRICS
            self.seen.append(len(path.read_text().splitlines()))

    peek = Peek()
    engine.run(job(epochs=3, log={"every": 1}), plugins=[peek])
    assert peek.seen == [1, 2, 3]  # the epoch's logging point comes before on_epoch_end


@pytest.mark.slow
def test_a_metrics_write_that_fails_is_cut_back_to_whole_lines_and_the_summary_says_so(tmp_path):
    """A full disk, as `ulimit -f` makes one: metrics.jsonl may not grow past 2 kB."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    overrides = ["log.every=1", "epochs=200", "run_name=full", "checkpoint.every_seconds=0"]
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", *(f"--set={item}" for item in overrides)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=limited,
    )
    assert done.returncode == 1
    assert "cannot write" in done.stderr and "metrics.jsonl: OSError: [Errno 27] File too large" in done.stderr
    run_dir = tmp_path / "runs" / "full"
    text = (run_dir / METRICS).read_text()
    assert text.endswith("\n") and len(text) <= 2048
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert summary["epochs_completed"] == len(lines)
    assert not list(run_dir.rglob("*.tmp"))


def test_a_resumed_run_cuts_the_lines_its_checkpoint_did_not_know(tmp_path):
    engine.run(job(epochs=4, run_name="cut", log={"every": 1}, checkpoint={"every_steps": 2, "keep_last": 5}))
    run_dir = tmp_path / "runs" / "cut"
    whole = (run_dir / METRICS).read_text().splitlines(keepends=True)
    # As a run killed after epoch 3 leaves it: a line past its last checkpoint (step 2), and half of one.
    for later in sorted((run_dir / "checkpoints").glob("step-*"))[1:]:
        later.unlink()
    (run_dir / METRICS).write_text("".join(whole[:3]) + whole[3][:10])
    engine.run(None, resume=run_dir)
    resumed = read_jsonl(run_dir / METRICS)
    assert [line["epoch"] for line in resumed] == [1, 2, 3, 4]
    assert [line["loss"] for line in resumed] == [json.loads(line)["loss"] for line in whole]


def test_a_metrics_file_cut_shorter_than_its_checkpoint_knew_goes_on_after_its_last_whole_line(tmp_path):
    engine.run(job(epochs=4, run_name="cut", log={"every": 1}, checkpoint={"every_steps": 1}))
    metrics = tmp_path / "runs" / "cut" / METRICS
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[1][:10])  # a fault cut it inside its second line
    engine.run(None, resume=tmp_path / "runs" / "cut", overrides=["epochs=5"])
    resumed = read_jsonl(metrics)  # whole lines: no zero bytes where the lost ones were
    assert [line["epoch"] for line in resumed] == [1, 5]
    assert metrics.read_text().startswith(lines[0])


# --- the runs table ------------------------------------------------------------------------------


def make_runs() -> None:
    engine.run({"epochs": 6, "run_name": "short", "data": {"val_fraction": 0.2}})
    engine.run({"epochs": 30, "run_name": "long", "optimizer": {"lr": 0.1}})
    engine.run({"epochs": 2, "run_name": "gone"})
    summary = Path("runs/gone/summary.json")
    running = {**json.loads(summary.read_text()), "status": "running", "pid": 2**22 + 12345}  # no such process
    summary.write_text(json.dumps(running))


def test_the_runs_table_sorts_by_a_column_and_spots_crashed_runs(capsys):
    make_runs()
    capsys.readouterr()
    assert main(["runs", "--sort", "loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "status", "epochs", "loss", "best", "wall_s", "started"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert [line.split()[0] for line in lines[1:]] == ["long", "short", "gone"]  # lowest loss first
    assert rows["gone"][1] == "crashed" and rows["short"][1] == "completed"
    assert rows["short"][2] == "6" and rows["long"][2] == "30"
    best = min(line["val_loss"] for line in read_jsonl(Path("runs/short") / METRICS))
    assert rows["short"][4:6] == ["val_loss", f"{best:.4g}"]
    assert main(["runs", "--sort", "epochs", "--reverse"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["long", "short", "gone"]
    assert main(["runs", "--sort", "epochs"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["gone", "short", "long"]


def test_runs_names_a_missing_directory(capsys):
    assert main(["runs", "nowhere"]) == 2
    assert capsys.readouterr().err == "error: runs_dir: 'nowhere' is not a directory\n"


def status(name: str) -> str:
    rows = {line.split()[0]: line.split()[1] for line in runs_table("runs").splitlines()[1:]}
    return rows[name]


# Holds a run's lock as the engine does (engine.runs.Lock), without importing torch.
HOLDER = """
import fcntl, os, socket, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.ftruncate(descriptor, 0)
os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


def test_a_run_is_running_while_a_process_holds_its_lock_and_crashed_once_that_process_died():
    engine.run(job(epochs=2, run_name="held"))
    run_dir = Path("runs/held")
    assert status("held") == "completed"
    summary = run_dir / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "running"}))  # as SIGKILL leaves it
    assert status("held") == "crashed"  # whatever its pid: no process holds the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert status("held") == "running"
        host = socket.gethostname()
        with pytest.raises(engine.ConfigError, match=rf"^run 'held' is in use by pid {holder.pid} on {host} "):
            engine.run(resume=run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert status("held") == "crashed"  # the kernel released the lock of the killed process


def test_the_table_reads_summary_json_alone_when_the_run_wrote_no_metrics_file():
    result = engine.run(job(epochs=3, run_name="plain"), blocked=["metrics_file"])
    assert not (result.run_dir / METRICS).exists()
    [_, row] = runs_table("runs").splitlines()
    assert row.split()[:4] == ["plain", "completed", "3", f"{result.metrics['loss']:.4g}"]


def test_a_metrics_file_that_is_a_link_out_of_the_run_is_never_written_through(tmp_path):
    """A resume cuts metrics.jsonl back to its checkpoint: through a link it would cut another file."""
    result = engine.run(job(epochs=3, log={"every": 1}, checkpoint={"every_steps": 1}))
    victim = tmp_path / "victim.txt"
    victim.write_text("a line that must stay\n" * 50)
    (result.run_dir / METRICS).unlink()
    (result.run_dir / METRICS).symlink_to(victim)
    with pytest.raises(engine.TrainingError, match=r"failed in hook on_run_start: .*metrics.jsonl' is a link: a run's"):
        engine.run(resume=result.run_dir, overrides=["epochs=4"])
    assert victim.read_text() == "a line that must stay\n" * 50
