"""plugins/early_stopping.py: stop after `patience` validations without improvement, and end the
run with the best epoch's model (`final_model`) while the trainer and its checkpoints keep the
trained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_plugins.checkpoint import Checkpoints
from torch import nn

import engine
from tests.helpers import rewind

# Overfits fast: a large model on few samples with a high learning rate.
OVERFIT = {
    "epochs": 60,
    "run_name": "overfit",
    "data": {"name": "classification", "n_samples": 80, "n_features": 20, "batch_size": 16, "val_fraction": 0.5},
    "model": {"name": "mlp", "hidden": [64, 64]},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"lr": 0.02},
    "log": {"every": 1},
}


class Weights:
    """The trained weights and validation loss at each epoch's end."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    @engine.hookimpl
    def on_epoch_end(self, epoch, state, trainer):
        weights = {name: tensor.clone() for name, tensor in trainer.module.state_dict().items()}
        self.by_epoch[epoch] = (state.val_metrics["val_loss"], weights)


class Accuracies:
    """The validation accuracy of each epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, float] = {}

    @engine.hookimpl(tryfirst=True)
    def on_epoch_end(self, epoch, state):
        self.by_epoch[epoch] = state.val_metrics["val_accuracy"]


def same(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return weights.keys() == expected.keys() and all(torch.equal(weights[name], expected[name]) for name in weights)


def last_checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Checkpoints().find_checkpoint(run_dir, "last")
    return engine.runs.load(path, engine.runs.CHECKPOINT_FORMAT)["model"]


def test_it_stops_after_patience_validations_without_improvement_and_ends_with_the_best(capsys):
    seen = Weights()
    trainer = engine.setup({**OVERFIT, "early_stopping": {"patience": 4}}, plugins=[seen])
    result = trainer.fit()
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    last = max(losses)
    assert last == best + 4 < 60  # stopped four validations after the best
    assert result.model is trainer.final_module is not trainer.module
    assert same(result.model.state_dict(), seen.by_epoch[best][1])
    assert same(torch.load(result.run_dir / "model.pt", weights_only=True)["model"], seen.by_epoch[best][1])
    assert same(engine.load(result.run_dir).state_dict(), seen.by_epoch[best][1])
    # The trainer and the end-of-run checkpoint keep the last epoch's trained weights, which go
    # with its optimizer state.
    assert same(trainer.module.state_dict(), seen.by_epoch[last][1])
    assert Checkpoints().find_checkpoint(result.run_dir, "last").name == f"step-{last * 3:09d}.pt"
    assert same(last_checkpoint(result.run_dir), seen.by_epoch[last][1])
    out = capsys.readouterr().out
    assert f"early stopping at epoch {last}: val_loss has not improved for 4 validations" in out
    assert f"the run ends with the model of epoch {best}" in out


def test_restore_best_false_ends_with_the_trained_weights():
    seen = Weights()
    result = engine.run({**OVERFIT, "early_stopping": {"patience": 4, "restore_best": False}}, plugins=[seen])
    last = max(seen.by_epoch)
    assert last < 60 and same(result.model.state_dict(), seen.by_epoch[last][1])


def test_min_delta_mode_and_an_unknown_monitor():
    lenient = engine.run({**OVERFIT, "run_name": "delta", "early_stopping": {"patience": 2, "min_delta": 10.0}})
    assert lenient.state.step == 3 * 3  # nothing beats the first epoch by 10: stopped at epoch 3
    accuracy = Accuracies()
    maximized = engine.run(
        {**OVERFIT, "run_name": "max", "early_stopping": {"patience": 3, "monitor": "val_accuracy", "mode": "max"}},
        plugins=[accuracy],
    )
    best, stop, waited = None, None, 0  # mode "max": the stop a running maximum gives
    for epoch, value in sorted(accuracy.by_epoch.items()):
        if best is None or value > best:
            best, waited = value, 0
        else:
            waited += 1
            if waited == 3:
                stop = epoch
                break
    assert stop is not None and maximized.state.epoch - 1 == stop == max(accuracy.by_epoch)
    with pytest.raises(engine.TrainingError, match=r"early_stopping.monitor: 'val_f2' is not a metric of this run"):
        engine.run({**OVERFIT, "run_name": "typo", "early_stopping": {"patience": 2, "monitor": "val_f2"}})


def test_off_by_default_and_then_never_called():
    off = engine.setup({**OVERFIT, "epochs": 3})
    on = engine.setup({**OVERFIT, "epochs": 3, "run_name": "on", "early_stopping": {"patience": 2}})
    assert len(on.epoch_end) == len(off.epoch_end) + 1  # bound only when switched on
    result = off.fit()
    assert result.state.epoch == 4 and result.model is off.module  # nothing chose another model


def test_a_run_that_ends_without_stopping_checkpoints_its_trained_weights_and_tests_the_best():
    seen = Weights()
    job = {**OVERFIT, "epochs": 12, "early_stopping": {"patience": 50}}
    trainer = engine.setup({**job, "data": {**OVERFIT["data"], "test_fraction": 0.25}}, plugins=[seen])
    result = trainer.fit()
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    assert best != 12  # the run overfits: the best epoch is not the last
    assert same(last_checkpoint(result.run_dir), seen.by_epoch[12][1])
    saved = torch.load(result.run_dir / "model.pt", weights_only=True)["model"]
    assert same(saved, seen.by_epoch[best][1])
    # The test split is evaluated once, on the model the run ended with.
    x, y = trainer.loaders.test_data
    with torch.inference_mode():
        expected = nn.functional.cross_entropy(engine.load(result.run_dir)(x), y).item()
    assert result.metrics["test_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_resumed_run_keeps_its_best_model(tmp_path):
    job = {**OVERFIT, "epochs": 12, "early_stopping": {"patience": 50}, "checkpoint": {"every_epochs": 1}}
    seen = Weights()
    whole = engine.run(job, plugins=[seen])
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    assert best < 11  # the best epoch comes before the checkpoint the run resumes from: restored, not seen again
    resumed = engine.run(resume=rewind(whole.run_dir, 11 * 3, tmp_path / "resumed"))
    assert same(resumed.model.state_dict(), seen.by_epoch[best][1])
    assert same(resumed.model.state_dict(), whole.model.state_dict())


def test_a_training_metric_is_monitored_at_logging_points_in_a_run_that_validates():
    # The training loss only falls: as "min" nothing stops the run, as "max" it stops 2 epochs in.
    job = {**OVERFIT, "epochs": 6, "run_name": "loss", "early_stopping": {"patience": 2, "monitor": "loss"}}
    assert engine.run(job).state.epoch - 1 == 6
    job = {**job, "run_name": "loss-max", "early_stopping": {**job["early_stopping"], "mode": "max"}}
    assert engine.run(job).state.epoch - 1 == 3
