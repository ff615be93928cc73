"""engine/resuming.py: a resume continues the same run. A change of what defines the run's course
(the model, loss, optimizer, scheduler, data and its split, batch size, precision, accumulation,
seed, device, acceleration) is refused naming each key with its old and new values; what does not
change the course (how long, what is logged, when checkpoints are taken) may change; anything else
only with --allow-change, which the summary records."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest

import engine
from engine.cli import main
from tests.helpers import job, read_json, rewind

BASE = job(
    epochs=4,
    seed=3,
    data={"name": "classification", "n_samples": 120, "n_features": 4, "batch_size": 20, "val_fraction": 0.25},
    model={"name": "mlp", "hidden": [8]},
    loss={"name": "cross_entropy"},
    optimizer={"name": "adam", "lr": 0.01},
    scheduler={"name": "cosine"},
    checkpoint={"every_steps": 2, "keep_last": 20},
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """BASE trained once: 3 batches an epoch, a checkpoint every 2 steps. A refused resume writes
    nothing, so the tests that expect one share it; the others resume a copy."""
    runs_dir = tmp_path_factory.mktemp("runs")
    return engine.run({**BASE, "runs_dir": str(runs_dir)}).run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.activation=gelu"], "model.activation 'relu' -> 'gelu'"),
        (["model.hidden=[16]"], "model.hidden [8] -> [16]"),
        ({"optimizer": {"name": "sgd"}}, "optimizer.name 'adam' -> 'sgd'"),  # not its settings' comings and goings
        (["optimizer.lr=0.1"], "optimizer.lr 0.01 -> 0.1"),
        ({"scheduler": {"name": "step"}}, "scheduler.name 'cosine' -> 'step'"),
        (["loss.label_smoothing=0.1"], "loss.label_smoothing 0.0 -> 0.1"),
        (["data.n_samples=160"], "data.n_samples 120 -> 160"),
        (["data.val_fraction=0.5"], "data.val_fraction 0.25 -> 0.5"),
        (["data.split_seed=1"], "data.split_seed 0 -> 1"),
        (["data.batch_size=10"], "data.batch_size 20 -> 10"),
        (["precision.name=bf16-mixed"], "precision.name '32' -> 'bf16-mixed'"),
        (["grad_accumulation=2"], "grad_accumulation 1 -> 2"),
        (["seed=4"], "seed 3 -> 4"),
        (["device=cpu"], "device 'auto' -> 'cpu'"),
        (["accelerate.name=compile"], "accelerate.name 'eager' -> 'compile'"),  # refused before it compiles
        (["optimizer.lr=0.1", "data.batch_size=10"], "data.batch_size 20 -> 10, optimizer.lr 0.01 -> 0.1"),
    ],
)
def test_a_resume_that_changes_the_runs_course_is_refused_naming_each_change(trained, overrides, named):
    with pytest.raises(engine.ConfigError) as raised:
        if isinstance(overrides, dict):  # another component: the job again, as a user would give it
            engine.setup({**BASE, "runs_dir": str(trained.parent), **overrides}, resume=trained)
        else:
            engine.setup(resume=trained, overrides=overrides)
    message = str(raised.value)
    assert message == (
        f"--resume: run '{trained}' was trained with other settings: {named}; a resume continues the same run "
        "(allow a change with --allow-change KEY, recorded in its summary, or start a new run)"
    )
    assert not engine.runs.held(trained)  # refused before it was claimed, and let go


def test_what_does_not_change_the_course_may_change_and_is_recorded(trained):
    overrides = [
        "epochs=6",
        "log.every=2",
        "log.train_metrics=false",
        "checkpoint.every_steps=3",
        "early_stopping.patience=2",
        "metrics.confusion_matrix=false",
    ]
    trainer = engine.setup(resume=trained, overrides=overrides)
    try:
        changes = {change["key"]: (change["from"], change["to"], change["override"]) for change in trainer.changes}
        assert changes == {
            "epochs": (4, 6, False),
            "log.every": (0, 2, False),
            "log.train_metrics": (True, False, False),
            "checkpoint.every_steps": (2, 3, False),
            "early_stopping.patience": (0, 2, False),
            "metrics.confusion_matrix": (True, False, False),
        }
        assert {change["step"] for change in trainer.changes} == {20}  # the checkpoint it resumes from
    finally:
        trainer.release()


def test_an_allowed_change_goes_through_and_every_change_stays_in_the_summary(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    engine.run(resume=run_dir, overrides=["optimizer.lr=0.02", "epochs=5"], allow_changes=["optimizer.lr"])
    first = [
        {"key": "epochs", "from": 4, "to": 5, "step": 20, "override": False},
        {"key": "optimizer.lr", "from": 0.01, "to": 0.02, "step": 20, "override": True},
    ]
    assert read_json(run_dir / "summary.json")["changes"] == first
    # The next checkpoints record the new course: the same lr again is no change; the history stays.
    engine.run(resume=run_dir, overrides=["epochs=6"])
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert summary["changes"] == [*first, {"key": "epochs", "from": 5, "to": 6, "step": 25, "override": False}]


def test_allowing_a_section_or_a_components_name_allows_its_keys(trained):
    sgd = {**BASE, "runs_dir": str(trained.parent), "optimizer": {"name": "sgd", "lr": 0.1}}
    for allowed in (["optimizer"], ["optimizer.name"]):
        trainer = engine.setup(sgd, resume=trained, allow_changes=allowed)
        trainer.release()
        assert [change["key"] for change in trainer.changes] == ["optimizer.name", "optimizer.lr"]
    with pytest.raises(engine.ConfigError, match=r"^--allow-change: 'optimizr.lr' is no setting or section of the run"):
        engine.setup(resume=trained, allow_changes=["optimizr.lr"])


def test_data_that_changed_under_the_same_settings_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)).astype(np.float32), y=rng.integers(0, 2, 60))
    data = {"name": "npz", "path": str(tmp_path / "d.npz"), "batch_size": 20}
    result = engine.run(job(epochs=2, data=data, loss={"name": "cross_entropy"}))
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(80, 3)).astype(np.float32), y=rng.integers(0, 2, 80))
    with pytest.raises(engine.ConfigError, match=r"other settings: inferred.n_train 60 -> 80, "):
        engine.setup(resume=result.run_dir)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(60, 3)).astype(np.float32), y=rng.integers(0, 3, 60))
    with pytest.raises(
        engine.ConfigError, match=r"^inferred.n_outputs: the job was written for 2, but the data has 3$"
    ):
        engine.setup(resume=result.run_dir)  # a third class, against the config.toml it resumes with
    with pytest.raises(engine.ConfigError, match=r"other settings: inferred.n_outputs 2 -> 3;"):
        engine.setup(job(epochs=2, data=data, loss={"name": "cross_entropy"}), resume=result.run_dir)  # a new job


def test_an_allowed_change_of_the_batches_starts_the_interrupted_epoch_again(trained, tmp_path):
    run_dir = rewind(trained, 2, tmp_path / "rewound")  # step 2: the second of epoch 1's 5 batches
    with pytest.raises(engine.ConfigError, match=r"data.batch_size 20 -> 10"):
        engine.setup(resume=run_dir, overrides=["data.batch_size=10"])
    trainer = engine.setup(resume=run_dir, overrides=["data.batch_size=10"], allow_changes=["data.batch_size"])
    trainer.release()
    assert (trainer.state.epoch, trainer.state.batch, trainer.state.step) == (1, 0, 2)  # no sample skipped
    same = engine.setup(resume=run_dir)
    same.release()
    assert (same.state.epoch, same.state.batch) == (1, 2)  # unchanged: where it stopped


@dataclass(frozen=True)
class Mine:
    often: Annotated[int, engine.Range(ge=1), engine.Changeable()] = 1  # reports only
    strength: float = 1.0  # what the run trains with


class MyPlugin:
    @engine.hookimpl
    def register_settings(self):
        return {"mine": Mine}


def test_a_plugin_declares_which_of_its_settings_may_change(tmp_path):
    result = engine.run(job(epochs=2), plugins=[MyPlugin])
    trainer = engine.setup(resume=result.run_dir, overrides=["mine.often=5"], plugins=[MyPlugin])
    trainer.release()
    with pytest.raises(engine.ConfigError, match=r"other settings: mine.strength 1.0 -> 2.0;"):
        engine.setup(resume=result.run_dir, overrides=["mine.strength=2.0"], plugins=[MyPlugin])


def test_the_command_line_refuses_a_changed_run_in_one_line_and_allows_it_when_told(trained, tmp_path, capsys):
    run_dir = copy_of(trained, tmp_path)
    assert main(["run", "--resume", str(run_dir), "--set", "optimizer.lr=0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: run ") and err.count("\n") == 1 and "optimizer.lr 0.01 -> 0.1" in err
    assert read_json(run_dir / "summary.json") == read_json(trained / "summary.json")  # nothing written
    assert main(["run", "--resume", str(run_dir), "--set", "optimizer.lr=0.1", "--allow-change", "optimizer.lr"]) == 0
    assert read_json(run_dir / "summary.json")["changes"][0]["key"] == "optimizer.lr"
