"""plugins/metrics.py: whole-set validation metrics against definitions written out by hand."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import engine

pytest.importorskip("torchmetrics")

CLASSES = {
    "epochs": 3,
    "run_name": "classes",
    "data": {"name": "classification", "n_samples": 150, "n_classes": 3, "batch_size": 16, "val_fraction": 0.4},
    "model": {"name": "mlp", "hidden": [8]},
    "loss": {"name": "cross_entropy"},
}


def validation_outputs(trainer: engine.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = trainer.loaders.val_data
    with torch.no_grad():
        return trainer.module.eval()(x), y


def test_classification_metrics_are_those_of_the_whole_validation_set():
    trainer = engine.setup(CLASSES)
    result = trainer.fit()
    output, y = validation_outputs(trainer)
    predicted, classes = output.argmax(dim=1), 3
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    for target, guess in zip(y.tolist(), predicted.tolist()):
        matrix[target, guess] += 1
    tp = matrix.diag().float()
    precision = tp / matrix.sum(dim=0).clamp(min=1)
    recall = tp / matrix.sum(dim=1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros(classes))
    m = result.metrics
    assert m["val_precision"] == pytest.approx(precision.mean().item(), abs=1e-5)
    assert m["val_recall"] == pytest.approx(recall.mean().item(), abs=1e-5)
    assert m["val_f1"] == pytest.approx(f1.mean().item(), abs=1e-5)
    # AUROC one class against the rest: the share of (positive, negative) pairs ranked right.
    scores, aurocs = output.softmax(dim=1), []
    for c in range(classes):
        positive, negative = scores[y == c, c], scores[y != c, c]
        pairs = (positive[:, None] > negative[None, :]).float() + 0.5 * (positive[:, None] == negative[None, :]).float()
        aurocs.append(pairs.mean().item())
    assert m["val_auroc"] == pytest.approx(sum(aurocs) / classes, abs=1e-5)
    saved = json.loads((result.run_dir / "confusion_matrix.json").read_text())
    assert saved["matrix"] == matrix.tolist() and saved["rows"] == "target"


def test_regression_metrics():
    trainer = engine.setup({"epochs": 5, "run_name": "regression", "data": {"val_fraction": 0.3}})
    result = trainer.fit()
    output, y = validation_outputs(trainer)
    error = output - y
    assert result.metrics["val_mae"] == pytest.approx(error.abs().mean().item(), rel=1e-5)
    assert result.metrics["val_rmse"] == pytest.approx(error.pow(2).mean().sqrt().item(), rel=1e-5)
    r2 = 1 - error.pow(2).sum() / (y - y.mean()).pow(2).sum()
    assert result.metrics["val_r2"] == pytest.approx(r2.item(), rel=1e-4)


def test_r2_with_batches_of_one_and_a_split_of_one():
    # The setup's check runs the metrics on one batch: of 1 sample here, where r2 is undefined.
    result = engine.run({"epochs": 2, "run_name": "ones", "data": {"batch_size": 1, "val_fraction": 0.2}})
    assert result.metrics["val_r2"] > -1 and result.state.step == 2 * 80
    with pytest.raises(engine.ConfigError) as raised:
        engine.run({"run_name": "one", "data": {"n_samples": 5, "test_fraction": 0.2}})
    assert str(raised.value) == (
        "metrics.regression: r2 needs at least 2 samples, but the test data has 1: more samples, "
        "or metrics.regression without r2"
    )
    assert not Path("runs/one").exists()


def test_the_choice_of_metrics_and_their_average_are_settings():
    result = engine.run(
        {**CLASSES, "metrics": {"classification": ["f1"], "average": "micro", "confusion_matrix": False}}
    )
    assert {name for name in result.metrics if name.startswith("val_")} == {
        "val_loss",
        "val_cross_entropy",
        "val_accuracy",
        "val_f1",
    }
    assert result.metrics["val_f1"] == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)  # micro F1
    assert not (result.run_dir / "confusion_matrix.json").exists()
    with pytest.raises(engine.ConfigError, match=r"metrics.classification\[0\]: expected one of 'precision'"):
        engine.load_config({**CLASSES, "metrics": {"classification": ["f2"]}})


def test_no_validation_data_no_metrics_and_no_per_step_call():
    trainer = engine.setup({"epochs": 2, "run_name": "plain"})
    assert trainer.compute_metrics == []
    assert not any(name.startswith("val_") for name in trainer.fit().metrics)


def test_a_class_absent_from_the_validation_set_scores_zero_without_a_warning(tmp_path):
    generator = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=generator.normal(size=(30, 2)), y=np.array([0, 1, 2] * 10))
    np.savez(tmp_path / "val.npz", x=generator.normal(size=(10, 2)), y=np.array([0, 1] * 5))  # no class 2
    data = {"name": "npz", "path": str(tmp_path / "train.npz"), "val_path": str(tmp_path / "val.npz")}
    job = {**CLASSES, "data": data}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics' "No positive samples in targets", at every validation
        result = engine.run(job)
    assert 0 <= result.metrics["val_recall"] < 1


def test_a_sequence_task_reports_perplexity_and_per_position_accuracy_and_no_per_class_metric():
    sequences = {
        "epochs": 4,
        "run_name": "sequences",
        "data": {"name": "tests.helpers:next_tokens", "batch_size": 16, "val_fraction": 0.25},
        "model": {"name": "tests.helpers:token_model"},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"lr": 0.05},
    }
    trainer = engine.setup(sequences)
    result = trainer.fit()
    x, y = trainer.loaders.val_data
    with torch.no_grad():
        logits = trainer.module.eval()(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
    m = result.metrics
    assert m["val_loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert m["val_perplexity"] == pytest.approx(loss.exp().item(), rel=1e-5)
    assert m["val_accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=1e-6)
    assert not {"val_f1", "val_precision", "val_auroc"} & set(m)
    assert not (result.run_dir / "confusion_matrix.json").exists()
    asked = engine.run({**sequences, "run_name": "asked", "metrics": {"sequence": ["f1"]}}).metrics
    assert 0 <= asked["val_f1"] <= 1
