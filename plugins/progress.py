"""A tqdm progress bar over the run's batches, on a terminal only, once the run has lasted two
seconds, so that short jobs and logs stay clean; of a run's processes, by rank 0.

While the bar is shown, the run's standard output goes through `tqdm.write`, so an epoch line
never glues to the bar; the plugin restores ``sys.stdout`` when the run ends.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TextIO

import engine


@dataclass(frozen=True)
class Settings:
    progress: Annotated[bool, engine.Changeable()] = True  # a tqdm bar on a terminal


def shown(trainer: engine.TrainerView) -> bool:
    return trainer.config["log"]["progress"] and sys.stderr.isatty() and trainer.rank == 0


class Progress:
    def __init__(self) -> None:
        self.bar: Any = None
        self.stdout: TextIO | None = None

    @engine.hookimpl
    def register_settings(self):
        return {"log": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return not shown(trainer)

    @engine.hookimpl
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        if not shown(trainer):
            return
        from tqdm import tqdm
        from tqdm.contrib import DummyTqdmFile

        total = trainer.length.batches  # train steps, as after_step counts them
        self.bar = tqdm(
            total=total, initial=trainer.state.step, unit="step", delay=2.0, leave=False, dynamic_ncols=True
        )
        # Whole lines go through tqdm.write: above the bar, which tqdm clears and redraws.
        self.stdout, sys.stdout = sys.stdout, DummyTqdmFile(sys.stdout)

    @engine.hookimpl
    def after_step(self) -> None:
        self.bar.update()

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    @engine.hookimpl
    def on_run_end(self) -> None:
        if self.bar is not None:
            above, sys.stdout = sys.stdout, self.stdout
            del above  # DummyTqdmFile writes a last partial line when it goes
            self.bar.close()
