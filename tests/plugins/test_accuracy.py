"""plugins/accuracy.py: accuracy for classification, averaged over the validation set (val_accuracy)
and over each epoch's training steps (train_accuracy)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_plugins import accuracy

import engine
from tests.helpers import job


class Fake:
    info = engine.DataInfo(2, 3, "classification", 4)


def test_accuracy_is_the_share_of_arg_max_hits():
    output = torch.tensor([[0.9, 0.1, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 0])
    assert accuracy.compute_metrics(engine.Batch(None, target), output, Fake())["accuracy"].item() == 0.75


def test_no_accuracy_for_regression_and_no_call_per_step():
    trainer = engine.setup(job(data={"val_fraction": 0.2}), blocked=["metrics"])
    assert accuracy.skip_per_step(trainer) is True
    assert trainer.compute_metrics == []  # not bound: a regression run never calls it
    assert set(trainer.fit().metrics) == {"epoch", "step", "loss", "mse", "lr", "val_loss", "val_mse"}


def test_training_accuracy_is_the_mean_over_the_epochs_steps():
    class Steps:
        def __init__(self) -> None:
            self.hits: list[float] = []

        @engine.hookimpl
        def after_step(self, terms):
            self.hits.append(terms["train_accuracy"].item())

    steps = Steps()
    result = engine.run(
        job(
            epochs=2,
            log={"every": 1},
            data={"name": "classification", "n_samples": 96, "batch_size": 32},
            model={"name": "mlp", "hidden": [8]},
            loss={"name": "cross_entropy"},
        ),
        plugins=[steps],
    )
    assert len(steps.hits) == 6 and result.metrics["train_accuracy"] == pytest.approx(sum(steps.hits[3:]) / 3)
    off = engine.run(
        job(
            epochs=1,
            run_name="off",
            log={"train_metrics": False},
            loss={"name": "cross_entropy"},
            data={"name": "classification", "n_samples": 96},
            model={"name": "mlp", "hidden": [8]},
        )
    )
    assert "train_accuracy" not in off.metrics


def test_validation_accuracy_matches_the_model_on_the_validation_set():
    trainer = engine.setup(
        job(
            epochs=5,
            data={"name": "classification", "n_samples": 203, "batch_size": 16, "val_fraction": 0.3, "separation": 2.0},
            model={"name": "mlp", "hidden": [16]},
            loss={"name": "cross_entropy"},
        )
    )
    result = trainer.fit()
    x, y = trainer.loaders.val_data
    with torch.no_grad():
        expected = (result.model.eval()(x).argmax(dim=1) == y).float().mean().item()
    assert result.metrics["val_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert 0.5 < result.metrics["val_accuracy"] <= 1


def test_a_sequence_tasks_accuracy_is_per_position_leaving_padding_out():
    output = torch.tensor([[[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[0, 0, -100], [0, 1, 1]])  # 5 counted positions, hits at 3 of them
    batch = engine.Batch(torch.zeros(2, 3, dtype=torch.long), target)
    [value] = accuracy.compute_metrics(batch, output, SimpleNamespace(info=None)).values()
    assert value.item() == pytest.approx(3 / 5)
