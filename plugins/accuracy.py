"""Accuracy for classification: the share of samples whose arg-max logit is the target; logged as
``val_accuracy`` and, inside each train step, ``train_accuracy``."""

from __future__ import annotations

import torch

import engine


@engine.hookimpl
def skip_per_step(trainer: engine.Trainer) -> bool:
    return trainer.info.task != "classification"


@engine.hookimpl
def compute_metrics(batch: engine.Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": (output.argmax(dim=1) == batch.y).float().mean()}
