"""``python -m engine runs``: a table of the runs of a folder, from their summary.json (the core's)
and metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import engine

from .curves import METRICS, finite

COLUMNS = ("name", "status", "epochs", "loss", "best", "wall_s", "started")


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
    validated = [line["val_loss"] for line in lines if finite(line.get("val_loss"))]
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
