"""plugins/metrics.py: step losses reduced at each logging point; a non-finite loss stops the run."""

from __future__ import annotations

import math

import pytest

import engine
from tests.helpers import Recorder, job, read_json, read_jsonl


def test_logged_loss_is_the_mean_of_the_epochs_steps():
    class Losses:
        def __init__(self) -> None:
            self.values: list[float] = []

        @engine.hookimpl
        def after_step(self, loss):
            self.values.append(loss.item())

    losses = Losses()
    result = engine.run(job(epochs=2, data={"batch_size": 25}, log={"every": 1}), plugins=[losses])
    logged = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in logged] == [1, 2] and [line["step"] for line in logged] == [4, 8]
    assert logged[0]["loss"] == pytest.approx(sum(losses.values[:4]) / 4)
    assert logged[1]["loss"] == pytest.approx(sum(losses.values[4:]) / 4)


def test_log_every_defaults_to_a_tenth_of_the_run_and_logs_the_last_epoch():
    recorder = Recorder()
    result = engine.run(job(epochs=25), plugins=[recorder])
    assert [line["epoch"] for line in read_jsonl(result.run_dir / "metrics.jsonl")] == [2 * i for i in range(1, 13)] + [
        25
    ]
    assert recorder.calls.count("on_log") == 13


def test_log_every_must_not_be_negative():
    with pytest.raises(engine.ConfigError, match=r"log.every: must be 0 .auto. or positive, got -1"):
        engine.run(job(log={"every": -1}))


class Poison:
    """A loss term that turns NaN at one step."""

    def __init__(self, at: int) -> None:
        self.at = at

    @engine.hookimpl
    def compute_loss(self, output, trainer):
        bad = float("nan") if trainer.state.step == self.at else 0.0
        return {"poison": output.sum() * 0 + bad}


def test_a_nan_is_reported_at_its_epoch_step_and_term():
    with pytest.raises(engine.TrainingError) as raised:
        engine.run(job(epochs=6, data={"batch_size": 50}, log={"every": 3}), plugins=[Poison(at=7)])
    assert str(raised.value) == "non-finite loss (nan) in term 'poison' at epoch 4, step 7; training stopped"


def test_a_nan_run_keeps_the_lines_logged_before_it_and_a_failed_summary():
    with pytest.raises(engine.TrainingError):
        engine.run(job(epochs=6, data={"batch_size": 50}, log={"every": 2}), plugins=[Poison(at=9)])
    logged = read_jsonl(engine.setup(job()).run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in logged] == [2, 4]
    assert all(math.isfinite(line["loss"]) for line in logged)
    summary = read_json(engine.setup(job()).run_dir / "summary.json")
    assert summary["status"] == "failed" and "epoch 5, step 9" in summary["error"]
    assert summary["train_loss"] == logged[-1]["loss"]
