"""Learning-rate schedulers: the `[scheduler]` section picks one by name (default "none").

The core builds the scheduler on the final optimizer and steps it: `step` once per epoch,
`warmup_cosine` and `onecycle` after every optimizer step (with gradient accumulation, once per
accumulation window), `cosine` once per epoch when the run is whole epochs and after every
optimizer step when ``max_steps`` ends it (or the data is endless). The schedules over the run
span its optimizer steps (`engine.RunLength.total_steps`: ``max_steps``, or the epochs' steps,
whichever ends first).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, OneCycleLR, StepLR

import engine

Positive = Annotated[float, engine.Range(gt=0)]
Fraction = Annotated[float, engine.Range(ge=0, le=1)]


def none() -> None:
    """A constant learning rate."""
    return None


def step_lr(
    optimizer: torch.optim.Optimizer,
    length: engine.RunLength,
    step_size: Annotated[int, engine.Range(ge=1)] = 30,
    gamma: Positive = 0.1,
) -> engine.Scheduled:
    """Multiply the learning rate by `gamma` every `step_size` epochs."""
    if length.steps_per_epoch is None:
        raise engine.ConfigError(
            "scheduler.name: 'step' counts epochs, and the training data is endless (it has none): "
            "use warmup_cosine, cosine or onecycle, which span the run's max_steps"
        )
    return engine.Scheduled(StepLR(optimizer, step_size=step_size, gamma=gamma), per_epoch=True)


def cosine(
    optimizer: torch.optim.Optimizer, length: engine.RunLength, eta_min: Annotated[float, engine.Range(ge=0)] = 0.0
) -> engine.Scheduled:
    """Cosine decay from the optimizer's learning rate to `eta_min` over the run: per epoch over
    its epochs when it is whole epochs, else per optimizer step over its steps."""
    if length.epochs is None:
        return engine.Scheduled(CosineAnnealingLR(optimizer, T_max=length.total_steps, eta_min=eta_min))
    return engine.Scheduled(CosineAnnealingLR(optimizer, T_max=length.epochs, eta_min=eta_min), per_epoch=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    length: engine.RunLength,
    warmup_steps: Annotated[int, engine.Range(ge=0)] = 100,
    min_ratio: Fraction = 0.0,
) -> engine.Scheduled:
    """Linear warm-up over `warmup_steps` optimizer steps, then cosine decay to `min_ratio` x the base rate."""
    total = length.total_steps
    warmup = min(warmup_steps, total)

    def factor(index: int) -> float:
        if index < warmup:
            return (index + 1) / warmup
        progress = (index - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return engine.Scheduled(LambdaLR(optimizer, factor))


def onecycle(
    optimizer: torch.optim.Optimizer,
    length: engine.RunLength,
    max_lr: Positive = 0.1,
    pct_start: Annotated[float, engine.Range(gt=0, lt=1)] = 0.3,
) -> engine.Scheduled:
    """The one-cycle policy over the whole run, stepped per optimizer step."""
    scheduler = OneCycleLR(optimizer, max_lr=max_lr, total_steps=length.total_steps, pct_start=pct_start)
    return engine.Scheduled(scheduler)


@engine.hookimpl
def register_components():
    return {
        "default": {"scheduler": "none"},
        "scheduler": {
            "none": none,
            "step": step_lr,
            "cosine": cosine,
            "warmup_cosine": warmup_cosine,
            "onecycle": onecycle,
        },
    }
