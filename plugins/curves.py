"""Leaves ``curves.png`` in the run directory at the end of the run: its losses and metrics over
the epochs (`python -m engine plot` draws several runs overlaid). Only when matplotlib is
installed (the ``plot`` extra) and ``log.curves`` is on; drawing costs about a second, once."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import engine


@dataclass(frozen=True)
class Settings:
    curves: bool = True  # curves.png in the run directory when matplotlib is installed


@engine.hookimpl
def register_settings():
    return {"log": Settings}


@engine.hookimpl
def on_run_end(trainer: engine.Trainer, error: BaseException | None) -> None:
    if trainer.run_dir is None or not trainer.config["log"]["curves"] or trainer.rank:
        return
    if importlib.util.find_spec("matplotlib") is None:
        return
    if (trainer.run_dir / engine.runs.METRICS).is_file():
        engine.plot([trainer.run_dir], trainer.run_dir / "curves.png")
