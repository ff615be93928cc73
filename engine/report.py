"""Reading run directories back: the table of runs (`python -m engine runs`) and their curves
(`python -m engine plot`, and ``curves.png`` at the end of a run through the curves plugin)."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs
from .errors import ConfigError, one_line


@dataclass(slots=True)
class RunRow:
    """One run as the table shows it."""

    name: str
    status: str
    epochs: int | None
    loss: float | None
    best: str  # the best validation value and its metric, e.g. "val_loss 0.0912"
    wall_s: float | None
    started: str


COLUMNS = ("name", "status", "epochs", "loss", "best", "wall_s", "started")


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a metrics.jsonl (a killed run may have cut its last one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            break
    return lines


def alive(pid: int, host: str) -> bool | None:
    """Whether process `pid` runs on `host`; None when the run was on another host."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_row(run_dir: Path) -> RunRow:
    try:
        summary = json.loads((run_dir / runs.SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status", "unknown")
    if status == "running" and alive(summary.get("pid", -1), summary.get("host", "")) is False:
        status = "crashed"
    lines = read_lines(run_dir / runs.METRICS)
    best = best_ranked(run_dir)
    if best is None:  # no ranking: the lowest validation loss logged
        validated = [("val_loss", line["val_loss"]) for line in lines if _finite(line.get("val_loss"))]
        best = min(validated, key=lambda item: item[1]) if validated else None
    return RunRow(
        name=run_dir.name,
        status=status,
        epochs=summary.get("epochs_completed", lines[-1]["epoch"] if lines else None),
        loss=summary.get("train_loss", lines[-1].get("loss") if lines else None),
        best=f"{best[0]} {best[1]:.4g}" if best else "",
        wall_s=summary.get("wall_time_s", lines[-1].get("time") if lines else None),
        started=summary.get("started", ""),
    )


def best_ranked(run_dir: Path) -> tuple[str, float] | None:
    """The best checkpoint's (metric, value) from checkpoints/best.json, measured every epoch."""
    try:
        index = json.loads((run_dir / runs.CHECKPOINTS / runs.BEST_INDEX).read_text(encoding="utf-8"))
        return (index["monitor"], index["ranking"][0]["value"]) if index["ranking"] else None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def runs_table(runs_dir: str | Path, sort: str = "started", descending: bool = False) -> str:
    """A table of the runs in `runs_dir`, sorted by a column (unknown values last)."""
    parent = Path(runs_dir)
    if not parent.is_dir():
        raise ConfigError(f"runs_dir: '{parent}' is not a directory")
    if sort not in COLUMNS:
        from .errors import suggest

        raise ConfigError(f"--sort: unknown column {sort!r}{suggest(sort, COLUMNS)}")
    rows = [run_row(path) for path in parent.iterdir() if (path / runs.CONFIG).is_file()]
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


def plot(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """The runs' curves over epochs, overlaid, in one PNG: the losses (training solid, validation
    dashed), then each other metric they log. Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, no screen
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise ConfigError("plot: matplotlib is not installed (pip install 'torch-plugin-engine[plot]')") from None
    curves: dict[str, list[dict[str, Any]]] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / runs.METRICS).is_file():
            raise ConfigError(f"plot: '{run_dir}' is not a run directory (it has no {runs.METRICS})")
        curves[run_dir.name] = read_lines(run_dir / runs.METRICS)
    metrics = _panels([line for lines in curves.values() for line in lines])
    columns = 1 if len(metrics) <= 3 else 2
    rows = -(-len(metrics) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(7 * columns, 3 * rows), squeeze=False, sharex=True)
    phases = (("", "-", "training"), ("train_", "-", "training"), ("val_", "--", "validation"))
    for axis, metric in zip(axes.flat, metrics):
        for index, (name, lines) in enumerate(curves.items()):
            for prefix, style, phase in phases:
                points = [
                    (line["epoch"], line[prefix + metric]) for line in lines if _finite(line.get(prefix + metric))
                ]
                if points:
                    label = f"{name}: {phase}"
                    axis.plot(*zip(*points), style, marker="o", markersize=3, color=f"C{index % 10}", label=label)
        axis.set_title(metric, fontsize="medium")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a run that failed before its first logging point has none
            axis.legend(fontsize="small")
    for axis in axes.flat[len(metrics) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
    figure.tight_layout()
    out = Path(out)
    try:
        figure.savefig(out, dpi=100)
    except OSError as error:
        raise ConfigError(f"plot: cannot write '{out}': {one_line(error)}") from None
    finally:
        pyplot.close(figure)
    return out


def _panels(lines: list[dict[str, Any]]) -> list[str]:
    """The metrics to draw, each once: "loss" first, then the others by the name without val_ and
    train_, except a loss term that is the whole loss (a run with one term)."""
    found: dict[str, None] = {"loss": None}
    for line in lines:
        for key in line:
            if key in ("epoch", "step", "time", "lr") or not _finite(line[key]):
                continue
            found[key.removeprefix("val_").removeprefix("train_")] = None

    def the_loss(name: str) -> bool:
        measured = [line for line in lines if name in line or f"val_{name}" in line]
        return all(
            line.get(name) == line["loss"] and line.get(f"val_{name}") == line.get("val_loss") for line in measured
        )

    return ["loss", *(name for name in found if name != "loss" and not the_loss(name))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
