"""plugins/console.py: the tutorial's line at each logging point, then the learned parameters."""

from __future__ import annotations

import pytest

import engine
from tests.helpers import job


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_the_tutorial_line_and_the_learned_parameters(capsys):
    result = engine.run(job(epochs=20))
    out = lines(capsys)
    assert (
        out[0]
        == f"Epoch [2/20], Loss: {engine.run(job(epochs=2, run_name='two'), blocked=['console']).metrics['loss']:.4f}"
    )
    assert out[9] == f"Epoch [20/20], Loss: {result.metrics['loss']:.4f}"
    w, b = result.model.weight.item(), result.model.bias.item()
    assert out[10] == f"Learned parameters: weight = {w:.4f}, bias = {b:.4f}"
    assert len(out) == 12


def test_validation_columns(capsys):
    result = engine.run(
        job(
            epochs=2,
            data={"name": "classification", "n_samples": 40, "val_fraction": 0.25},
            model={"name": "mlp", "hidden": [4]},
            loss={"name": "cross_entropy"},
        )
    )
    m = result.metrics
    assert lines(capsys)[1] == (
        f"Epoch [2/2], Loss: {m['loss']:.4f}, Acc: {m['train_accuracy']:.4f}, Val Loss: {m['val_loss']:.4f}, "
        f"Val Acc: {m['val_accuracy']:.4f}, Val F1: {m['val_f1']:.4f}"
    )


def test_a_larger_model_prints_its_parameter_count(capsys):
    engine.run(job(epochs=1, model={"name": "tests.helpers:scaled_model"}, data={"n_samples": 10}))
    assert "Learned parameters: linear.weight = 0." in lines(capsys)[1]
    engine.run(job(epochs=1, run_name="mlp", model={"name": "mlp", "hidden": [8]}))
    assert lines(capsys)[1] == "Model: 25 parameters"  # 1*8 + 8 + 8*1 + 1


def test_nothing_after_a_failure(capsys):
    class Fail:
        @engine.hookimpl
        def on_epoch_end(self):
            raise ValueError("no")

    with pytest.raises(engine.TrainingError):
        engine.run(job(), plugins=[Fail()])
    # The epoch's logging point comes before on_epoch_end; nothing is printed after the failure.
    assert lines(capsys) == ["Epoch [1/3], Loss: 5.4040", "Run files: runs/quick"]
