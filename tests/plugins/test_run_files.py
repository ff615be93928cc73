"""plugins/run_files.py: runs/<name>/ with config.toml, metrics.jsonl and summary.json."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import engine
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
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "metrics.jsonl", "summary.json"]

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
        "val_loss",
        "val_cross_entropy",
        "val_accuracy",
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


def test_unnamed_runs_get_distinct_timestamped_directories():
    first = engine.run({"epochs": 1})
    second = engine.run({"epochs": 1})
    assert first.run_dir != second.run_dir
    assert first.run_dir.parent == second.run_dir.parent == Path("runs")
    assert second.run_dir.name.startswith(first.run_dir.name[:15])  # YYYYmmdd-HHMMSS


def test_runs_dir_and_run_name(tmp_path):
    result = engine.run(job(runs_dir=str(tmp_path / "elsewhere"), run_name="named"))
    assert result.run_dir == tmp_path / "elsewhere" / "named"
    assert (result.run_dir / "summary.json").is_file()
    assert not list(result.run_dir.glob("*.tmp"))


def test_a_run_that_fails_before_starting_writes_nothing():
    with pytest.raises(engine.ConfigError):
        engine.run(job(loss={"name": "nope"}))
    assert not Path("runs").exists()
