"""Learning-rate schedulers: the `[scheduler]` section picks one by name (default "none").

Each is stepped when it needs: `step` and `cosine` once per epoch, `warmup_cosine` and `onecycle`
after every optimizer step (with gradient accumulation, once per accumulation window).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, OneCycleLR, StepLR

import engine


class Schedule(NamedTuple):
    """How long the run is, for schedulers that need it."""

    epochs: int
    steps_per_epoch: int  # optimizer steps per epoch


class Scheduled(NamedTuple):
    scheduler: LRScheduler
    per_step: bool  # stepped after each optimizer step, else after each epoch


def none() -> None:
    """A constant learning rate."""
    return None


def step(optimizer: torch.optim.Optimizer, step_size: int = 30, gamma: float = 0.1) -> Scheduled:
    """Multiply the learning rate by `gamma` every `step_size` epochs."""
    return Scheduled(StepLR(optimizer, step_size=step_size, gamma=gamma), per_step=False)


def cosine(optimizer: torch.optim.Optimizer, schedule: Schedule, eta_min: float = 0.0) -> Scheduled:
    """Cosine decay from the optimizer's learning rate to `eta_min` over the run's epochs."""
    return Scheduled(CosineAnnealingLR(optimizer, T_max=schedule.epochs, eta_min=eta_min), per_step=False)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int = 100, min_ratio: float = 0.0
) -> Scheduled:
    """Linear warm-up over `warmup_steps` optimizer steps, then cosine decay to `min_ratio` x the base rate."""
    total = schedule.epochs * schedule.steps_per_epoch
    warmup = min(warmup_steps, total)

    def factor(index: int) -> float:
        if index < warmup:
            return (index + 1) / warmup
        progress = (index - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return Scheduled(LambdaLR(optimizer, factor), per_step=True)


def onecycle(
    optimizer: torch.optim.Optimizer, schedule: Schedule, max_lr: float = 0.1, pct_start: float = 0.3
) -> Scheduled:
    """The one-cycle policy over the whole run, stepped per optimizer step."""
    scheduler = OneCycleLR(
        optimizer, max_lr=max_lr, epochs=schedule.epochs, steps_per_epoch=schedule.steps_per_epoch, pct_start=pct_start
    )
    return Scheduled(scheduler, per_step=True)


class Schedulers:
    def __init__(self) -> None:
        self.scheduled: Scheduled | None = None
        self.accumulation = 1
        self.batches = 1

    @engine.hookimpl
    def register_settings(self):
        return {"scheduler": {"name": "none"}}

    @engine.hookimpl
    def register_components(self):
        return {
            "scheduler": {
                "none": none,
                "step": step,
                "cosine": cosine,
                "warmup_cosine": warmup_cosine,
                "onecycle": onecycle,
            }
        }

    @engine.hookimpl
    def on_run_start(self, trainer: engine.Trainer) -> None:
        self.accumulation, self.batches = trainer.accumulation, trainer.batches_per_epoch
        schedule = Schedule(trainer.epochs, math.ceil(self.batches / self.accumulation))
        self.scheduled = trainer.build("scheduler", optimizer=trainer.optimizer, schedule=schedule)
        trainer.scheduler = self.scheduled.scheduler if self.scheduled else None

    @engine.hookimpl
    def after_step(self, state: engine.State) -> None:
        if self.scheduled is None or not self.scheduled.per_step:
            return
        if state.batch % self.accumulation == 0 or state.batch == self.batches:  # the optimizer stepped
            self.scheduled.scheduler.step()

    @engine.hookimpl
    def on_epoch_end(self) -> None:
        if self.scheduled is not None and not self.scheduled.per_step:
            self.scheduled.scheduler.step()
