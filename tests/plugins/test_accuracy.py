"""plugins/accuracy.py: validation accuracy for classification, averaged over the validation set."""

from __future__ import annotations

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


def test_no_accuracy_for_regression():
    trainer = engine.setup(job(data={"val_fraction": 0.2}))
    assert accuracy.compute_metrics(None, None, trainer) is None
    assert set(trainer.fit().metrics) == {"epoch", "step", "loss", "mse", "val_loss", "val_mse"}


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
