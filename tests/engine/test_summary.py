"""The core's files in a run's directory (engine/runs.py, engine/trainer.py): config.toml, which
reruns as a job; summary.json, "running" from the start and then how the run ended; model.pt, the
final model; the directory's creation; and the command line around them (--quiet, --version, a
closed pipe, ENGINE_BLOCK). None of them needs a plugin that can be blocked."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import engine
from engine.cli import main
from tests.helpers import job, read_json

runs = engine.runs
CLASSES = {"name": "classification", "n_samples": 60, "batch_size": 20, "val_fraction": 0.25}


def test_a_run_writes_its_resolved_config_summary_and_model_beside_its_plugins_files(tmp_path):
    result = engine.run(
        job(
            epochs=7,
            log={"every": 3},
            data=CLASSES,
            model={"name": "mlp", "hidden": [4]},
            loss={"name": "cross_entropy"},
        )
    )
    run_dir = tmp_path / "runs" / "quick"
    assert result.run_dir.resolve() == run_dir
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",  # held by the process that trained it (engine.runs.Lock); the space it kept is freed
        "checkpoints",  # the checkpoint plugin's
        "config.toml",
        "confusion_matrix.json",  # the metrics plugin's
        "metrics.jsonl",  # the metrics_file plugin's
        "model.pt",
        "summary.json",
    ]

    config = tomllib.loads((run_dir / "config.toml").read_text())
    again, _ = engine.load_config(config)
    assert again.to_dict() == result.config.to_dict()
    assert config["model"]["hidden"] == [4] and config["optimizer"]["lr"] == 0.01  # defaults filled in
    assert config["inferred"] == {
        "n_features": 20,
        "n_outputs": 4,
        "task": "classification",
        "threshold": 0.5,
        "input_transform": "",
        "input_shape": [20],
        "classes": [],
    }

    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 7 and summary["steps"] == 21
    assert summary["train_loss"] == result.metrics["loss"]
    assert summary["val_loss"] == result.metrics["val_loss"]
    assert summary["val_accuracy"] == result.metrics["val_accuracy"]
    assert summary["wall_time_s"] > 0 and summary["steps_per_s"] == pytest.approx(21 / summary["wall_time_s"], rel=0.01)
    assert summary["pid"] == os.getpid() and summary["run_name"] == "quick"
    assert "error" not in summary and "resumed_from" not in summary

    saved = runs.load(run_dir / "model.pt", runs.MODEL_FORMAT)
    assert set(saved) == {"format", "model", "step"} and saved["step"] == 21
    assert saved["model"].keys() == result.model.state_dict().keys()
    assert all(torch.equal(saved["model"][name], value) for name, value in result.model.state_dict().items())


def test_the_written_config_runs_again_as_a_job_with_the_same_result():
    first = engine.run(job(epochs=4, data={"batch_size": 30}, run_name="first"))
    again = engine.run(first.run_dir / "config.toml", overrides=["run_name=again"])
    assert again.metrics["loss"] == first.metrics["loss"]


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
        'epochs = 3\nrun_name = "first"\nplugins = ["extra_loss.py"]\n'
        '[data]\nname = "npz"\npath = "data/train.npz"\nstandardize = true\n'
    )
    first = engine.run(job_dir / "job.toml")  # run from tmp_path: the job's paths are the job file's
    config_file = first.run_dir.absolute() / "config.toml"
    recorded = tomllib.loads((first.run_dir / "config.toml").read_text())
    assert recorded["data"]["path"] == str(job_dir / "data" / "train.npz")
    assert recorded["plugins"] == [str(job_dir / "extra_loss.py")]
    assert recorded["inferred"] == {
        "n_features": 3,
        "n_outputs": 1,
        "task": "regression",
        "threshold": 0.5,
        "input_transform": "standardize",
        "input_shape": [3],
        "classes": [],
    }
    monkeypatch.chdir(elsewhere)
    again = engine.run(config_file, overrides=["run_name=again"])
    assert again.metrics == first.metrics and "tiny" in again.metrics


def test_the_summary_says_running_from_the_start():
    class Look:
        @engine.hookimpl
        def on_run_start(self, trainer):
            self.config = (trainer.run_dir / "config.toml").is_file()

        @engine.hookimpl
        def after_step(self, trainer):
            self.summary = read_json(trainer.run_dir / "summary.json")

    look = Look()
    engine.run(job(epochs=2), plugins=[look])
    assert look.config
    assert look.summary["status"] == "running"
    assert set(look.summary) == {"status", "run_name", "pid", "host", "started"}
    assert look.summary["pid"] == os.getpid()


def test_summary_json_is_strict_and_names_what_was_not_finite(tmp_path):
    runs.write_json(tmp_path / "s.json", {"train_loss": float("nan"), "val_loss": float("inf"), "steps": 3})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {
        "train_loss": None,
        "val_loss": None,
        "steps": 3,
        "non_finite": ["train_loss", "val_loss"],
    }
    assert "NaN" not in text and "Infinity" not in text
    assert runs.read_summary(tmp_path) == {}  # no summary.json there
    (tmp_path / "summary.json").write_text("[1, 2")
    assert runs.read_summary(tmp_path) == {}  # half written: unreadable, not an error


def test_model_pt_holds_the_final_model_chain_and_engine_load_returns_it():
    """model.pt is what `final_model` returns (here a plugin's halved weights), not the trained module."""

    class Halved:
        @engine.hookimpl
        def final_model(self, module, ending):
            if not ending:  # the checkpoints keep the trained weights
                return None
            halved = type(module)(1, 1)
            halved.load_state_dict({name: value / 2 for name, value in module.state_dict().items()})
            return halved

    result = engine.run(job(epochs=3), plugins=[Halved()])
    trainer_weight = engine.load(result.run_dir, which="last").weight  # the trained weights, checkpointed
    assert torch.equal(result.model.weight, trainer_weight / 2)
    assert torch.equal(engine.load(result.run_dir).weight, trainer_weight / 2)


def test_a_failed_run_writes_no_model_and_says_why():
    class FailAtThree:
        @engine.hookimpl
        def after_step(self, state):
            if state.step == 3:
                raise RuntimeError("disk on fire")

    with pytest.raises(engine.TrainingError, match="disk on fire"):
        engine.run(job(epochs=5), plugins=[FailAtThree()])
    summary = read_json(Path("runs/quick/summary.json"))
    assert summary["status"] == "failed" and summary["steps"] == 3
    assert (
        summary["error"]
        == "epoch 3, step 3: plugin 'FailAtThree' failed in hook after_step: RuntimeError: disk on fire"
    )
    assert not Path("runs/quick/model.pt").exists()


class PrunesAt:
    """Stops the run at the end of epoch `epoch`, naming the status it ends with (a search's pruner)."""

    def __init__(self, epoch: int, status: str, stop: bool = True) -> None:
        self.epoch, self.status, self.stop = epoch, status, stop

    @engine.hookimpl
    def on_epoch_end(self, epoch, state):
        if epoch == self.epoch:
            state.stop, state.stop_status = self.stop, self.status


def test_a_plugin_that_stops_the_run_names_the_status_it_ends_with():
    data = {"name": "classification", "n_samples": 60, "batch_size": 20, "val_fraction": 0.25}
    result = engine.run(
        job(epochs=6, data=data, model={"name": "mlp"}, loss={"name": "cross_entropy"}), plugins=[PrunesAt(2, "pruned")]
    )
    summary = read_json(result.run_dir / "summary.json")
    assert summary["status"] == "pruned" and summary["epochs_completed"] == 2 and summary["steps"] == 6
    assert summary["val_loss"] == result.metrics["val_loss"]  # the last validation's, as a completed run's
    assert torch.equal(engine.load(result.run_dir)(torch.ones(1, 20)), result.model(torch.ones(1, 20)))
    # The status goes with the stop: a plugin that names one without stopping changes nothing.
    again = engine.run(job(epochs=3, run_name="again"), plugins=[PrunesAt(2, "pruned", stop=False)])
    assert read_json(again.run_dir / "summary.json")["status"] == "completed"


def test_a_plugin_failing_in_on_run_end_does_not_prevent_the_summary():
    class BrokenLogger:
        @engine.hookimpl
        def on_run_end(self):
            raise OSError("tensorboard writer closed")

    with pytest.raises(engine.TrainingError, match=r"plugin 'BrokenLogger' failed in hook on_run_end: OSError"):
        engine.run(job(), plugins=[BrokenLogger])
    summary = read_json(Path("runs/quick/summary.json"))
    assert summary["status"] == "failed" and "BrokenLogger" in summary["error"]
    assert (Path("runs/quick") / "model.pt").is_file()  # written before on_run_end


@pytest.mark.parametrize("blocked", [["checkpoint", "metrics_file"], ["checkpoint", "metrics_file", "console"]])
def test_the_core_files_need_no_blockable_plugin(blocked):
    result = engine.run(job(epochs=3, run_name="bare"), blocked=blocked)
    files = sorted(path.name for path in result.run_dir.iterdir())
    assert files == [".lock", "config.toml", "model.pt", "summary.json"]
    assert read_json(result.run_dir / "summary.json")["status"] == "completed"
    assert torch.equal(engine.load(result.run_dir).weight, result.model.weight)


# --- the run directory's creation --------------------------------------------------------------


def test_unnamed_runs_get_distinct_timestamped_directories(monkeypatch):
    # Both runs within one second of the clock, whatever the machine's speed.
    monkeypatch.setattr(runs, "time", SimpleNamespace(strftime=lambda fmt: "20261126-023532"))
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


def test_a_named_run_that_exists_is_exit_2_and_its_files_stay_as_they_were(capsys):
    first = engine.run(job(epochs=2, run_name="mine"))
    before = {path.name: path.read_bytes() for path in first.run_dir.iterdir() if path.is_file()}
    assert main(["run", "--set", "run_name=mine", "--set", "epochs=3"]) == 2
    assert capsys.readouterr().err == "error: run 'mine' exists: use --resume runs/mine or another run_name\n"
    assert {path.name: path.read_bytes() for path in first.run_dir.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("name", ["..", "../outside", "/tmp/abs", "x" * 201])  # every rule: tests/engine/test_runs.py
def test_run_name_must_be_one_plain_name(name, tmp_path):
    with pytest.raises(engine.ConfigError, match=r"run_name: .* is not one plain name"):
        engine.setup(job(run_name=name))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_unnamed_runs_never_share_a_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(runs.time, "strftime", lambda _: "20260101-000000")  # all in one second
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        made.append(runs.create(tmp_path / "runs", ""))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8
    assert sorted(path.name for path in made)[:2] == ["20260101-000000", "20260101-000000-2"]


# --- the command line around a run's files ------------------------------------------------------


def test_version_and_quiet(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("torch-plugin-engine 0.")
    assert main(["run", "--quiet", "--set", "epochs=3", "--set", "run_name=silent"]) == 0
    assert capsys.readouterr() == ("", "")
    assert Path("runs/silent/model.pt").is_file()


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly_and_the_console_script_works(tmp_path):
    script = shutil.which("engine", path=str(Path(sys.executable).parent))
    assert script is not None, "the engine console script is installed beside python"
    done = subprocess.run(
        f"'{script}' run --set epochs=400 --set log.every=1 | head -n 2",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert [line.split(",")[0] for line in done.stdout.splitlines()] == ["Epoch [1/400]", "Epoch [2/400]"]
    assert done.stderr == ""  # no BrokenPipeError, no traceback
    [run_dir] = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_engine_block_blocks_plugins_for_every_run(monkeypatch):
    monkeypatch.setenv("ENGINE_BLOCK", "console, progress")
    assert {"console", "progress"}.isdisjoint(engine.make_plugins().names())
