"""A plugin that records the wall time of each train step: from one ``after_step`` to the next (the
data, the step, and whatever the host does between steps: logging points, validations, checkpoints),
as nanoGPT's train.py measures its iterations. Rank 0 writes ``step_times.json`` (seconds, in order)
into the run directory when the run ends.

    python -m engine run job.toml --plugin bench/examples/step_times.py:StepTimes
"""

from __future__ import annotations

import json
import time

import engine


class StepTimes:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = 0.0

    @engine.hookimpl
    def on_run_start(self) -> None:
        self.last = time.perf_counter()

    @engine.hookimpl
    def after_step(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    @engine.hookimpl
    def on_run_end(self, trainer: engine.TrainerView) -> None:
        if trainer.rank == 0 and trainer.run_dir is not None:
            engine.runs.write_text(trainer.run_dir / "step_times.json", json.dumps(self.times) + "\n")
