"""``metrics.jsonl`` in the run directory, one JSON line per logging point, and ``python -m engine
runs``, the table of a folder of runs.

Each line is `on_log`'s metrics with ``time``, the run's training seconds so far; it reaches the
file whole or not at all (a failed write is cut back to the last whole line and ends the run). A
resumed run cuts the file back to where its checkpoint was taken, so no line is duplicated or
lost. Of a run's processes, rank 0 alone writes it (the metrics are every process's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import engine

METRICS = "metrics.jsonl"
COLUMNS = ("name", "status", "epochs", "loss", "best", "wall_s", "started")


class MetricsFile:
    def __init__(self) -> None:
        self.file: int | None = None  # the open metrics.jsonl
        self.offset = 0  # its length after the last whole line

    @engine.hookimpl
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        if trainer.rank:
            return
        self.file = engine.runs.append_only(trainer.run_dir / METRICS)  # refuses a link out of the run
        if os.fstat(self.file).st_size < self.offset:
            # Shorter than when the checkpoint was taken (cut by a fault or by hand): go on after its
            # last whole line, not after the zero bytes that extending it would write.
            kept = os.pread(self.file, self.offset, 0)
            self.offset = kept.rfind(b"\n") + 1
        os.ftruncate(self.file, self.offset)  # a resumed run's lines after its checkpoint go
        os.lseek(self.file, self.offset, os.SEEK_SET)

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float], trainer: engine.TrainerView) -> None:
        if self.file is None:
            return  # not rank 0
        line = json.dumps({**metrics, "time": round(trainer.elapsed(), 4)}, allow_nan=False) + "\n"
        data = line.encode("utf-8")
        try:
            rest = memoryview(data)
            while rest:  # a short write (a disk filling up) is retried: the next one says why
                rest = rest[os.write(self.file, rest) :]
        except OSError as error:
            os.ftruncate(self.file, self.offset)  # the file ends with its last whole line
            raise engine.TrainingError(f"cannot write {trainer.run_dir / METRICS}: {engine.one_line(error)}") from None
        self.offset += len(data)

    @engine.hookimpl
    def save_plugin_state(self) -> dict[str, Any]:
        return {"metrics_file": {"bytes": self.offset}}

    @engine.hookimpl
    def load_plugin_state(self, state: Mapping[str, Any]) -> None:
        if "metrics_file" in state:
            self.offset = int(state["metrics_file"]["bytes"])

    @engine.hookimpl
    def on_run_end(self) -> None:
        if self.file is not None:
            os.close(self.file)
            self.file = None

    @engine.hookimpl
    def register_commands(self, commands: engine.Commands) -> None:
        table = commands.add("runs", runs_command, "a table of the runs in a runs directory")
        table.add_argument("runs_dir", nargs="?", default="runs", help="the runs directory (default: runs)")
        table.add_argument(
            "--sort", default="started", choices=COLUMNS, help="the column to sort by (default: started)"
        )
        table.add_argument("--reverse", action="store_true", help="sort in descending order")


def runs_command(args: argparse.Namespace) -> int:
    print(runs_table(args.runs_dir, args.sort, descending=args.reverse))
    return 0


@dataclass(slots=True)
class RunRow:
    """One run as the table shows it."""

    name: str
    status: str
    epochs: int | None
    loss: float | None
    best: str  # the lowest validation loss logged, e.g. "val_loss 0.0912"
    wall_s: float | None
    started: str


def run_row(run_dir: Path) -> RunRow:
    summary = engine.runs.read_summary(run_dir)
    status = summary.get("status", "unknown")
    # Running is what the run's lock says: a process holds it while it trains, and the kernel
    # releases it when the process dies, however it dies.
    if engine.runs.held(run_dir):
        status = "running"
    elif status == "running":
        status = "crashed"
    lines = engine.runs.read_lines(run_dir / METRICS)
    validated = [line["val_loss"] for line in lines if _finite(line.get("val_loss"))]
    last = lines[-1] if lines else {}
    return RunRow(
        name=run_dir.name,
        status=status,
        epochs=summary.get("epochs_completed", last.get("epoch")),
        loss=summary.get("train_loss", last.get("loss")),
        best=f"val_loss {min(validated):.4g}" if validated else "",
        wall_s=summary.get("wall_time_s", last.get("time")),
        started=summary.get("started", ""),
    )


def runs_table(runs_dir: str | Path, sort: str = "started", descending: bool = False) -> str:
    """A table of the runs in `runs_dir` (the folders with a config.toml), sorted by a column
    (unknown values last)."""
    parent = Path(runs_dir)
    if not parent.is_dir():
        raise engine.ConfigError(f"runs_dir: '{parent}' is not a directory")
    rows = [run_row(path) for path in parent.iterdir() if (path / engine.runs.CONFIG).is_file()]
    known = sorted((row for row in rows if getattr(row, sort) not in (None, "")), key=lambda row: getattr(row, sort))
    rows = [*(reversed(known) if descending else known), *(row for row in rows if getattr(row, sort) in (None, ""))]
    cells = [[_cell(getattr(row, column)) for column in COLUMNS] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(COLUMNS)]
    table = ["  ".join(column.ljust(width) for column, width in zip(COLUMNS, widths)).rstrip()]
    table += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
