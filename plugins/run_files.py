"""Writes the run's record in its directory (engine/runs.py): config.toml, metrics.jsonl and
summary.json.

- config.toml: the resolved config with what was inferred from the data and every plugin module
  loaded; it runs again as a job file from any directory.
- summary.json: written when the run starts (``"running"``, with pid, host and start time) and
  when it ends: ``"completed"``, ``"failed"`` or ``"interrupted"``, also when another plugin's
  `on_run_end` failed (this one runs last). Strict JSON: a non-finite value is ``null`` and named
  under ``"non_finite"``.
- metrics.jsonl: one line per logging point, each reaching the file whole or not at all (a failed
  write is cut back to the last whole line and ends the run). A resumed run cuts the file back to
  where its checkpoint was taken, so no line is duplicated or lost.

Of a run's processes, rank 0 alone writes them (the metrics are every process's; the error in the
summary is the first any process met).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import engine

runs = engine.runs


class RunFiles:
    def __init__(self) -> None:
        self.metrics: int | None = None  # the open metrics.jsonl
        self.offset = 0  # its length after the last whole line
        self.elapsed = 0.0  # training seconds before this process (a resumed run)
        self.started = 0.0
        self.started_at = ""
        self.summary: dict[str, Any] = {}

    @engine.hookimpl(tryfirst=True)  # the record exists before another plugin's start can fail
    def on_run_start(self, trainer: engine.Trainer) -> None:
        if trainer.rank:
            return
        run_dir = trainer.run_dir
        runs.write_text(run_dir / runs.CONFIG, engine.dump_toml(trainer.config))
        self.started, self.started_at = time.perf_counter(), now()
        self.summary = {
            "status": "running",
            "run_name": run_dir.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started_at,
        }
        if trainer.resumed_from is not None:
            self.summary["resumed_from"] = str(trainer.resumed_from.relative_to(run_dir))
        write_json(run_dir / runs.SUMMARY, self.summary)
        self.metrics = os.open(run_dir / runs.METRICS, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.metrics).st_size < self.offset:
            # Shorter than when the checkpoint was taken (cut by a fault or by hand): go on after its
            # last whole line, not after the zero bytes that extending it would write.
            kept = os.pread(self.metrics, self.offset, 0)
            self.offset = kept.rfind(b"\n") + 1
        os.ftruncate(self.metrics, self.offset)  # a resumed run's lines after its checkpoint go
        os.lseek(self.metrics, self.offset, os.SEEK_SET)

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float], trainer: engine.Trainer) -> None:
        if self.metrics is None:
            return  # not rank 0
        line = json.dumps({**metrics, "time": round(self.seconds(), 4)}, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        try:
            rest = memoryview(data)
            while rest:  # a short write (a disk filling up) is retried: the next one says why
                rest = rest[os.write(self.metrics, rest) :]
        except OSError as error:
            os.ftruncate(self.metrics, self.offset)  # the file ends with its last whole line
            raise engine.TrainingError(
                f"cannot write {trainer.run_dir / runs.METRICS}: {engine.one_line(error)}"
            ) from None
        self.offset += len(data)

    @engine.hookimpl
    def state_dict(self) -> dict[str, Any]:
        return {"metrics_bytes": self.offset, "elapsed": self.seconds()}

    @engine.hookimpl
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.offset, self.elapsed = int(state["metrics_bytes"]), float(state["elapsed"])

    @engine.hookimpl(trylast=True)  # after every other plugin has reported
    def on_run_end(self, trainer: engine.Trainer, error: BaseException | None) -> None:
        if self.metrics is None:
            return  # the run never started (there is no directory to write in), or not rank 0
        os.close(self.metrics)
        self.metrics = None
        state, wall = trainer.state, self.seconds()
        status = "completed" if error is None else "interrupted" if isinstance(error, engine.Interrupted) else "failed"
        summary: dict[str, Any] = {
            **self.summary,
            "status": status,
            "ended": now(),
            "epochs_completed": state.epoch - 1,
            "steps": state.step,
            "wall_time_s": round(wall, 4),
            "steps_per_s": round(state.step / wall, 2) if wall > 0 else None,
            "train_loss": state.metrics.get("loss"),
        }
        summary.update({name: value for name, value in state.metrics.items() if name.startswith("val_")})
        summary.update(state.test_metrics)  # the test at the end (data.test_fraction, data.test_path)
        if error is not None:
            summary["error"] = str(error) or type(error).__name__
        write_json(trainer.run_dir / runs.SUMMARY, summary)
        print(f"Run files: {trainer.run_dir}")

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started if self.started else 0.0)


def write_json(path: Path, values: dict[str, Any]) -> None:
    """`values` as strict JSON: a non-finite number becomes null and is named under "non_finite"."""
    bad = [key for key, value in values.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        values = {**{key: None if key in bad else value for key, value in values.items()}, "non_finite": bad}
    runs.write_text(path, json.dumps(values, indent=2, allow_nan=False) + "\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
