"""A tqdm progress bar over the run's batches, shown only on a terminal and only once the run has
lasted two seconds, so that short jobs and logs stay clean; of a run's processes, by rank 0."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import engine


@dataclass(frozen=True)
class Settings:
    progress: bool = True  # a tqdm bar on a terminal


class Progress:
    def __init__(self) -> None:
        self.bar: Any = None

    @engine.hookimpl
    def register_settings(self):
        return {"log": Settings}

    @engine.hookimpl
    def on_run_start(self, trainer: engine.Trainer) -> None:
        if trainer.config["log"]["progress"] and sys.stderr.isatty() and trainer.rank == 0:
            from tqdm import tqdm

            total = trainer.epochs * trainer.batches_per_epoch
            self.bar = tqdm(
                total=total, initial=trainer.state.step, unit="step", delay=2.0, leave=False, dynamic_ncols=True
            )

    @engine.hookimpl
    def after_step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    @engine.hookimpl
    def on_run_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
