"""plugins/early_stopping.py: stop after `patience` validations without improvement, and restore
the best epoch's weights."""

from __future__ import annotations

import pytest
import torch

import engine

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
    """The model's weights and validation loss at each epoch's end."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    @engine.hookimpl(tryfirst=True)  # before early stopping may restore other weights
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


def test_it_stops_after_patience_validations_without_improvement_and_restores_the_best(capsys):
    seen = Weights()
    result = engine.run({**OVERFIT, "early_stopping": {"patience": 4}}, plugins=[seen])
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    last = max(losses)
    assert last == best + 4 < 60  # stopped four validations after the best
    for name, weight in result.model.state_dict().items():
        assert torch.equal(weight, seen.by_epoch[best][1][name])
    saved = torch.load(result.run_dir / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[name], seen.by_epoch[best][1][name]) for name in saved)
    # The end-of-run checkpoint: the last epoch's trained weights, which go with its optimizer state.
    end = engine.runs.latest_checkpoint(result.run_dir)
    assert end.name == f"step-{last * 3:09d}.pt"
    checkpointed = engine.runs.load(end, engine.runs.CHECKPOINT_FORMAT)["model"]
    assert all(torch.equal(checkpointed[name], seen.by_epoch[last][1][name]) for name in checkpointed)
    out = capsys.readouterr().out
    assert f"early stopping at epoch {last}: val_loss has not improved for 4 validations" in out
    assert f"weights of epoch {best} restored" in out


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
    assert len(on.epoch_end) == len(off.epoch_end) + 2  # judge and restore, bound only when switched on
    assert off.fit().state.epoch == 4


def test_a_run_that_ends_without_stopping_checkpoints_its_trained_weights_and_saves_the_best():
    seen = Weights()
    result = engine.run({**OVERFIT, "epochs": 12, "early_stopping": {"patience": 50}}, plugins=[seen])
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    assert best != 12  # the run overfits: the best epoch is not the last
    last = engine.runs.latest_checkpoint(result.run_dir)
    checkpointed = engine.runs.load(last, engine.runs.CHECKPOINT_FORMAT)["model"]
    assert all(torch.equal(checkpointed[name], seen.by_epoch[12][1][name]) for name in checkpointed)
    saved = torch.load(result.run_dir / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[name], seen.by_epoch[best][1][name]) for name in saved)


def test_a_training_metric_is_monitored_at_logging_points_in_a_run_that_validates():
    # The training loss only falls: as "min" nothing stops the run, as "max" it stops 2 epochs in.
    job = {**OVERFIT, "epochs": 6, "run_name": "loss", "early_stopping": {"patience": 2, "monitor": "loss"}}
    assert engine.run(job).state.epoch - 1 == 6
    job = {**job, "run_name": "loss-max", "early_stopping": {**job["early_stopping"], "mode": "max"}}
    assert engine.run(job).state.epoch - 1 == 3
