"""plugins/run_files.py: runs/<name>/ with config.toml, metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine
import engine.runs
from tests.helpers import job, read_json, read_jsonl


def test_a_run_writes_its_resolved_config_metrics_and_summary(tmp_path):
    result = engine.run(
        job(
            epochs=7,
            log={"every": 3},
            data={"name": "classification", "n_samples": 60, "batch_size": 20, "val_fraction": 0.25},
            model={"name": "mlp", "hidden": [4]},
            loss={"name": "cross_entropy"},
        )
    )
    run_dir = tmp_path / "runs" / "quick"
    assert result.run_dir.resolve() == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "config.toml",
        "confusion_matrix.json",
        "metrics.jsonl",
        "model.pt",
        "summary.json",
    ]

    config = tomllib.loads((run_dir / "config.toml").read_text())
    again, _ = engine.load_config(config)
    assert again.to_dict() == result.config.to_dict()
    assert config["model"]["hidden"] == [4] and config["optimizer"]["lr"] == 0.01  # defaults filled in

    logged = read_jsonl(run_dir / "metrics.jsonl")
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
    assert logged[-1]["loss"] == result.metrics["loss"]

    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 7 and summary["steps"] == 21
    assert summary["train_loss"] == result.metrics["loss"]
    assert summary["val_loss"] == result.metrics["val_loss"]
    assert summary["val_accuracy"] == result.metrics["val_accuracy"]
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] == pytest.approx(21 / summary["wall_time_s"], rel=0.01)
    assert "error" not in summary


def test_the_written_config_runs_again_as_a_job_with_the_same_result():
    first = engine.run(job(epochs=4, data={"batch_size": 30}, run_name="first"))
    again = engine.run(first.run_dir / "config.toml", overrides=["run_name=again"])
    assert again.metrics["loss"] == first.metrics["loss"]


def test_metrics_lines_are_flushed_as_they_are_logged():
    class Peek:
        def __init__(self) -> None:
            self.seen: list[int] = []

        @engine.hookimpl
        def on_epoch_end(self, state, trainer):
            path = Path(trainer.run_dir) / "metrics.jsonl"
            self.seen.append(len(path.read_text().splitlines()))

    peek = Peek()
    engine.run(job(epochs=3, log={"every": 1}), plugins=[peek])
    assert peek.seen == [1, 2, 3]  # the epoch's logging point comes before on_epoch_end


def test_unnamed_runs_get_distinct_timestamped_directories(monkeypatch):
    # Both runs within one second of the clock, whatever the machine's speed.
    monkeypatch.setattr(engine.runs, "time", SimpleNamespace(strftime=lambda fmt: "20261126-023532"))
    first = engine.run({"epochs": 1})
    second = engine.run({"epochs": 1})
    assert first.run_dir == Path("runs/20261126-023532")
    assert second.run_dir == Path("runs/20261126-023532-2")


def test_an_unnamed_run_is_named_by_the_time_it_started():
    result = engine.run({"epochs": 1})
    assert result.run_dir.parent == Path("runs")
    assert re.fullmatch(r"\d{8}-\d{6}", result.run_dir.name)


def test_runs_dir_and_run_name(tmp_path):
    result = engine.run(job(runs_dir=str(tmp_path / "elsewhere"), run_name="named"))
    assert result.run_dir == tmp_path / "elsewhere" / "named"
    assert (result.run_dir / "summary.json").is_file()
    assert not list(result.run_dir.glob("*.tmp"))


def test_a_run_that_fails_before_starting_writes_nothing():
    with pytest.raises(engine.ConfigError):
        engine.run(job(loss={"name": "nope"}))
    assert not Path("runs").exists()


# --- the run directory's lifecycle -------------------------------------------------------------


def test_a_named_run_that_exists_is_exit_2_and_its_files_stay_as_they_were(capsys):
    from engine.cli import main

    first = engine.run(job(epochs=2, run_name="mine"))
    before = {path.name: path.read_bytes() for path in first.run_dir.iterdir() if path.is_file()}
    assert main(["run", "--set", "run_name=mine", "--set", "epochs=3"]) == 2
    assert capsys.readouterr().err == "error: run 'mine' exists: use --resume runs/mine or another run_name\n"
    assert {path.name: path.read_bytes() for path in first.run_dir.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("name", ["..", ".", "../outside", "/tmp/abs", "a/b", ".hidden", "-dash", "x" * 201])
def test_run_name_must_be_one_plain_name(name, tmp_path):
    with pytest.raises(engine.ConfigError, match=r"run_name: .* is not one plain name"):
        engine.setup(job(run_name=name))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_unnamed_runs_never_share_a_directory(monkeypatch, tmp_path):
    import threading

    monkeypatch.setattr(engine.runs.time, "strftime", lambda _: "20260101-000000")  # all in one second
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        made.append(engine.runs.create(tmp_path / "runs", ""))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8
    assert sorted(path.name for path in made)[:2] == ["20260101-000000", "20260101-000000-2"]


def test_the_summary_says_running_from_the_start():
    class Look:
        @engine.hookimpl
        def after_step(self, trainer):
            self.summary = read_json(trainer.run_dir / "summary.json")

    look = Look()
    engine.run(job(epochs=2), plugins=[look])
    assert look.summary["status"] == "running"
    assert set(look.summary) == {"status", "run_name", "pid", "host", "started"}
    assert look.summary["pid"] == __import__("os").getpid()


# --- faults ------------------------------------------------------------------------------------


def test_a_plugin_failing_in_on_run_end_does_not_prevent_the_summary():
    class BrokenLogger:
        @engine.hookimpl
        def on_run_end(self):
            raise OSError("tensorboard writer closed")

    with pytest.raises(engine.TrainingError, match=r"plugin 'BrokenLogger' failed in hook on_run_end: OSError"):
        engine.run(job(), plugins=[BrokenLogger])
    summary = read_json(Path("runs/quick/summary.json"))
    assert summary["status"] == "failed" and "BrokenLogger" in summary["error"]
    assert (Path("runs/quick") / "model.pt").is_file()  # the checkpoint plugin ran before it


def test_a_metrics_write_that_fails_is_cut_back_to_whole_lines_and_the_summary_says_so(tmp_path):
    """A full disk, as `ulimit -f` makes one: metrics.jsonl may not grow past 2 kB."""
    import resource
    import subprocess
    import sys

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
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text) <= 2048
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert summary["epochs_completed"] == len(lines)
    assert not list(run_dir.rglob("*.tmp"))


def test_summary_json_is_strict_and_names_what_was_not_finite(tmp_path):
    from engine_plugins.run_files import write_json

    write_json(tmp_path / "s.json", {"train_loss": float("nan"), "val_loss": float("inf"), "steps": 3})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {
        "train_loss": None,
        "val_loss": None,
        "steps": 3,
        "non_finite": ["train_loss", "val_loss"],
    }
    assert "NaN" not in text and "Infinity" not in text


# --- config.toml reruns from anywhere ----------------------------------------------------------


def test_config_toml_reruns_from_another_directory_with_its_plugins_data_and_sizes(tmp_path, monkeypatch):
    import numpy as np

    job_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (job_dir / "data").mkdir(parents=True)
    elsewhere.mkdir()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype("float32")
    np.savez(job_dir / "data" / "train.npz", x=x, y=(x.sum(axis=1, keepdims=True)).astype("float32"))
    (job_dir / "extra_loss.py").write_text(
        "import engine\n\n\n@engine.hookimpl\ndef compute_loss(output):\n"
        "    return {'tiny': 1e-3 * output.abs().mean()}\n"
    )
    (job_dir / "job.toml").write_text(
        'epochs = 3\nrun_name = "first"\nplugins = ["extra_loss.py"]\n[data]\nname = "npz"\npath = "data/train.npz"\n'
    )
    first = engine.run(job_dir / "job.toml")  # run from tmp_path: the job's paths are the job file's
    config_file = first.run_dir.absolute() / "config.toml"
    recorded = tomllib.loads((first.run_dir / "config.toml").read_text())
    assert recorded["data"]["path"] == str(job_dir / "data" / "train.npz")
    assert recorded["plugins"] == [str(job_dir / "extra_loss.py")]
    assert recorded["inferred"] == {"n_features": 3, "n_outputs": 1, "task": "regression"}
    monkeypatch.chdir(elsewhere)
    again = engine.run(config_file, overrides=["run_name=again"])
    assert again.metrics == first.metrics and "tiny" in again.metrics


def test_a_metrics_file_cut_shorter_than_its_checkpoint_knew_goes_on_after_its_last_whole_line(tmp_path):
    engine.run(job(epochs=4, run_name="cut", log={"every": 1}, checkpoint={"every_steps": 1}))
    metrics = tmp_path / "runs" / "cut" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[1][:10])  # a fault cut it inside its second line
    engine.run(None, resume=tmp_path / "runs" / "cut", overrides=["epochs=5"])
    resumed = read_jsonl(metrics)  # whole lines: no zero bytes where the lost ones were
    assert [line["epoch"] for line in resumed] == [1, 5]
    assert metrics.read_text().startswith(lines[0])
