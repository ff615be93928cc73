"""Writes ``runs/<run-name>/``: config.toml (resolved), metrics.jsonl (flushed as logged) and
summary.json. Whole files are written to a temporary name and renamed, so a crash never leaves a
half-written one; metrics.jsonl only grows by whole lines.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import engine


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


class RunFiles:
    def __init__(self) -> None:
        self.metrics_file: IO[str] | None = None
        self.started = 0.0

    @engine.hookimpl
    def on_run_start(self, trainer: engine.Trainer) -> None:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(trainer.run_dir / "config.toml", engine.dump_toml(trainer.config))
        self.metrics_file = open(trainer.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.started = time.perf_counter()

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        assert self.metrics_file is not None
        self.metrics_file.write(json.dumps({**metrics, "time": round(time.perf_counter() - self.started, 4)}) + "\n")
        self.metrics_file.flush()

    @engine.hookimpl(trylast=True)  # after every other plugin has reported
    def on_run_end(self, trainer: engine.Trainer, error: BaseException | None) -> None:
        if self.metrics_file is None:
            return  # failed before the run started: nothing was written
        self.metrics_file.close()
        wall = time.perf_counter() - self.started
        state = trainer.state
        summary: dict[str, Any] = {
            "status": "failed" if error else "completed",
            "epochs_completed": state.epoch - 1,
            "steps": state.step,
            "wall_time_s": round(wall, 4),
            "steps_per_s": round(state.step / wall, 2) if wall > 0 else None,
            "train_loss": state.metrics.get("loss"),
        }
        summary.update({name: value for name, value in state.metrics.items() if name.startswith("val_")})
        if error is not None:
            summary["error"] = str(error) or type(error).__name__  # KeyboardInterrupt has no message
        write_atomically(trainer.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"Run files: {trainer.run_dir}")
