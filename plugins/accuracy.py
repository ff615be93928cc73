"""Accuracy for classification: the share of samples whose arg-max logit is the target (binary
labels: whose probability of class 1 is on the target's side of ``data.threshold``, 0.5 by
default; a sequence task: the share of positions, those with a negative target, padding, left
out); logged as ``val_accuracy`` and, inside each train step, ``train_accuracy``."""

from __future__ import annotations

import math

import torch

import engine


@engine.hookimpl
def skip_per_step(trainer: engine.TrainerView) -> bool:
    return trainer.info.task not in ("classification", "binary", "sequence")


@engine.hookimpl
def compute_metrics(batch: engine.Batch, output: torch.Tensor, trainer: engine.TrainerView) -> dict[str, torch.Tensor]:
    if batch.y.is_floating_point():  # binary: 0/1 labels [N, 1], one logit each
        threshold = trainer.info.threshold
        logit = math.log(threshold / (1 - threshold))  # 0.0 for 0.5: the sigmoid is not computed
        return {"accuracy": ((output > logit).float() == batch.y).float().mean()}
    if batch.y.dim() > 1:  # a sequence: logits [N, T, C], a class index per position [N, T]
        counted = batch.y >= 0
        hits = (output.argmax(dim=-1) == batch.y) & counted
        return {"accuracy": hits.sum() / counted.sum().clamp_min(1)}
    return {"accuracy": (output.argmax(dim=1) == batch.y).float().mean()}
