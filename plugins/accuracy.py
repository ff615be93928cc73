"""Accuracy for classification: the share of samples whose arg-max logit is the target (binary
labels: whose logit is on the target's side of 0, a probability of 0.5); logged as
``val_accuracy`` and, inside each train step, ``train_accuracy``."""

from __future__ import annotations

import torch

import engine


@engine.hookimpl
def skip_per_step(trainer: engine.Trainer) -> bool:
    return trainer.info.task not in ("classification", "binary")


@engine.hookimpl
def compute_metrics(batch: engine.Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
    if batch.y.is_floating_point():  # binary: 0/1 labels [N, 1], one logit each
        return {"accuracy": ((output > 0).float() == batch.y).float().mean()}
    return {"accuracy": (output.argmax(dim=1) == batch.y).float().mean()}
