"""Validation accuracy for classification: the share of samples whose arg-max logit is the target."""

from __future__ import annotations

import torch

import engine


@engine.hookimpl
def compute_metrics(
    batch: engine.Batch, output: torch.Tensor, trainer: engine.Trainer
) -> dict[str, torch.Tensor] | None:
    if trainer.info.task != "classification":
        return None
    return {"accuracy": (output.argmax(dim=1) == batch.y).float().mean()}
