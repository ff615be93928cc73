"""Reduces the step losses to logged metrics at each logging point, and stops on a non-finite loss.

The loss tensors of every step since the last logging point are kept (on the device) and read
back with one host-device sync at the next point: no per-step sync, and a NaN is still reported
at the exact epoch and step where it first appeared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

import engine


class Metrics:
    def __init__(self) -> None:
        self.pending: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []
        self.names: tuple[str, ...] = ()
        self.every = 1

    @engine.hookimpl
    def register_settings(self):
        return {"log": {"every": 0}}  # epochs between logging points; 0: a tenth of the epochs

    @engine.hookimpl
    def on_run_start(self, trainer: engine.Trainer) -> None:
        every = trainer.config["log"]["every"]
        if every < 0:
            raise engine.ConfigError(f"log.every: must be 0 (auto) or positive, got {every}")
        self.every = every or max(1, trainer.epochs // 10)

    @engine.hookimpl
    def after_step(self, state: engine.State, loss: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = ("loss", *terms)
        self.pending.append((state.epoch, state.step, (loss, *terms.values())))

    @engine.hookimpl(trylast=True)
    def on_epoch_end(self, state: engine.State, trainer: engine.Trainer) -> None:
        if state.epoch % self.every and state.epoch != trainer.epochs and not state.stop:
            return
        steps = [(epoch, step) for epoch, step, _ in self.pending]
        width = len(self.names)
        values = (
            torch.stack([value.float() for *_, row in self.pending for value in row]).tolist() if self.pending else []
        )  # host-device sync
        self.pending.clear()
        rows = [values[i * width : (i + 1) * width] for i in range(len(steps))]
        for (epoch, step), row in zip(steps, rows):
            # The terms before the total ("loss"), so that the message names the term at fault.
            for name, value in [*zip(self.names[1:], row[1:]), (self.names[0], row[0])]:
                if not math.isfinite(value):
                    raise engine.TrainingError(
                        f"non-finite loss ({value}) in term {name!r} at epoch {epoch}, step {step}; training stopped",
                        located=True,
                    )
        this_epoch = [row for (epoch, _), row in zip(steps, rows) if epoch == state.epoch]
        metrics: dict[str, float] = {"epoch": state.epoch, "step": state.step}
        for column, name in enumerate(self.names):
            if this_epoch:
                metrics[name] = sum(row[column] for row in this_epoch) / len(this_epoch)
        metrics.update(state.val_metrics)
        state.metrics = metrics
        trainer.hooks.on_log(state=state, metrics=metrics, trainer=trainer)
