"""engine/steps.py: optimizer steps and train steps (batches) one into the other, the run's length,
and the windows of an endless stream."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

import engine
from engine.steps import clock_of, run_length
from tests.helpers import classification_data, epoch_order, job


def test_without_accumulation_optimizer_steps_are_batches():
    clock = clock_of([1.0] * 5, 5, 1)
    assert [clock.batches(steps) for steps in range(12)] == list(range(12))
    assert [clock.steps(batches) for batches in range(12)] == list(range(12))
    assert clock.next(3, 0) == 3 and clock.next(3, 3) == 6 and clock.next(3, 4) == 6
    assert clock.next(0, 4) == math.inf  # no such cadence


def test_with_accumulation_a_step_ends_with_its_window_and_windows_never_span_epochs():
    clock = clock_of([1.0] * 5, 5, 2)  # windows [1, 2], [3, 4], [5]: 3 optimizer steps an epoch
    assert [clock.batches(steps) for steps in range(7)] == [0, 2, 4, 5, 7, 9, 10]
    assert [clock.steps(batches) for batches in range(11)] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    assert clock.next(2, 0) == 4 and clock.next(2, 4) == 7  # every 2nd step: batches 4, 7 (2nd epoch's first window)


def test_an_endless_stream_repeats_its_windows_for_ever():
    clock = clock_of([1.0], None, 3)
    assert clock.period == (
        engine.Window(True, False, 1 / 3),
        engine.Window(False, False, 1 / 3),
        engine.Window(False, True, 1 / 3),
    )
    assert list(itertools.islice(clock.windows_from(4), 3)) == [clock.period[1], clock.period[2], clock.period[0]]
    assert clock.batches(5) == 15 and clock.steps(16) == 5


def test_the_run_ends_with_its_epochs_or_max_steps_whichever_comes_first():
    clock = clock_of([1.0] * 5, 5, 2)
    assert run_length(clock, 4, None) == engine.RunLength(4, 3, 12, 20)
    assert run_length(clock, 4, 5) == engine.RunLength(None, 3, 5, 9)  # within the second epoch
    assert run_length(clock, 4, 6) == engine.RunLength(2, 3, 6, 10)  # at the end of the second
    assert run_length(clock, None, 100) == engine.RunLength(None, 3, 100, 167)
    assert run_length(clock_of([1.0], None, 1), None, 30) == engine.RunLength(None, None, 30, 30)
    with pytest.raises(engine.ConfigError, match=r"^max_steps: required, the training data is endless"):
        run_length(clock_of([1.0], None, 1), 3, None)


# --- runs counted in steps ----------------------------------------------------------------------


class Logged:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.intervals: list[int] = []

    @engine.hookimpl
    def on_log(self, metrics):
        self.metrics.append(dict(metrics))

    @engine.hookimpl
    def on_interval_end(self, step):
        self.intervals.append(step)


def test_a_run_of_max_steps_matches_the_hand_written_loop_over_as_many_steps():
    seed, n, features, classes, batch_size, lr, steps = 3, 50, 4, 3, 10, 0.05, 7  # 5 batches an epoch
    x, y = classification_data(seed, n, features, classes, 2.0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for epoch in itertools.count(1):
        order = epoch_order(seed, epoch, n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        if len(losses) == steps:
            break

    logged = Logged()
    data = {"name": "classification", "n_samples": n, "n_features": features, "n_classes": classes}
    result = engine.run(
        {
            "seed": seed,
            "max_steps": steps,
            "log": {"every_steps": 3},
            "data": {**data, "separation": 2.0, "batch_size": batch_size},
            "model": {"name": "mlp", "hidden": [8], "activation": "tanh"},
            "loss": {"name": "cross_entropy"},
            "optimizer": {"name": "sgd", "lr": lr},
            "run_name": "steps",
        },
        plugins=[logged],
    )
    for mine, theirs in zip(result.model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # Logging points every 3 optimizer steps and at the last: each the mean since the one before,
    # across the epoch's end (steps 4 and 5 are epoch 1's).
    assert [(line["epoch"], line["step"]) for line in logged.metrics] == [(1, 3), (2, 6), (2, 7)]
    expected = [sum(losses[:3]) / 3, sum(losses[3:6]) / 3, losses[6]]
    assert [line["loss"] for line in logged.metrics] == pytest.approx(expected, abs=1e-5)
    assert logged.intervals == [3, 6, 7]  # none fell at an epoch's end
    summary = engine.runs.read_summary(result.run_dir)
    assert (summary["steps"], summary["epochs_completed"]) == (7, 1)


def test_validation_and_logging_every_n_optimizer_steps_with_accumulation():
    logged = Logged()
    engine.run(
        job(
            epochs=None,
            max_steps=6,
            grad_accumulation=2,  # 5 batches an epoch: windows of 2, 2 and 1, 3 optimizer steps
            val_every=0,
            val_every_steps=4,
            log={"every_steps": 2},
            data={"n_samples": 60, "batch_size": 10, "val_fraction": 1 / 6},
        ),
        plugins=[logged],
    )
    # Optimizer steps 2, 4 and 6 end at batches 4, 7 and 10 (the end of epoch 2): validation at step 4 and the last.
    assert [line["step"] for line in logged.metrics] == [4, 7, 10]
    assert ["val_loss" in line for line in logged.metrics] == [False, True, True]
    assert logged.metrics[1]["val_loss"] != logged.metrics[2]["val_loss"]
    assert logged.intervals == [4, 7]  # batch 10 ends epoch 2: on_epoch_end's


def test_early_stopping_and_the_best_checkpoint_judge_validations_counted_in_steps():
    result = engine.run(
        job(
            epochs=None,
            max_steps=400,
            val_every=0,
            val_every_steps=5,
            data={"n_samples": 60, "batch_size": 10, "val_fraction": 1 / 6},
            optimizer={"lr": 0.5},
            early_stopping={"patience": 2, "min_delta": 1.0},  # no validation improves by 1: it stops at the 3rd
            checkpoint={"keep_best": 1, "every_seconds": 0.0},
        ),
    )
    assert result.state.step == 15
    ranking = json.loads((result.run_dir / "checkpoints" / "best.json").read_text())["ranking"]
    assert [entry["step"] for entry in ranking] == [5]
