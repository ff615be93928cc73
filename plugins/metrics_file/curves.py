"""The curves of runs, drawn from their ``metrics.jsonl``: the run's ``curves.png`` at its end and
``python -m engine plot``, several runs overlaid. Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import engine

METRICS = "metrics.jsonl"


def plot(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """The runs' curves over epochs, overlaid, in one PNG: the losses (training solid, validation
    dashed), then each other metric they log. Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, no screen
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise engine.ConfigError(
            "plot: matplotlib is not installed (pip install 'torch-plugin-engine[plot]')"
        ) from None
    curves: dict[str, list[dict[str, Any]]] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / METRICS).is_file():
            raise engine.ConfigError(f"plot: '{run_dir}' has no {METRICS} (not a run directory, or none was logged)")
        curves[run_dir.name] = engine.runs.read_lines(run_dir / METRICS)
    metrics = _panels([line for lines in curves.values() for line in lines])
    columns = 1 if len(metrics) <= 3 else 2
    rows = -(-len(metrics) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(7 * columns, 3 * rows), squeeze=False, sharex=True)
    phases = (("", "-", "training"), ("train_", "-", "training"), ("val_", "--", "validation"))
    for axis, metric in zip(axes.flat, metrics):
        for index, (name, lines) in enumerate(curves.items()):
            for prefix, style, phase in phases:
                points = [(line["epoch"], line[prefix + metric]) for line in lines if finite(line.get(prefix + metric))]
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
        raise engine.ConfigError(f"plot: cannot write '{out}': {engine.one_line(error)}") from None
    finally:
        pyplot.close(figure)
    return out


def _panels(lines: list[dict[str, Any]]) -> list[str]:
    """The metrics to draw, each once: "loss" first, then the others by the name without val_ and
    train_, except a loss term that is the whole loss (a run with one term)."""
    found: dict[str, None] = {"loss": None}
    for line in lines:
        for key in line:
            if key in ("epoch", "step", "time", "lr") or not finite(line[key]):
                continue
            found[key.removeprefix("val_").removeprefix("train_")] = None

    def the_loss(name: str) -> bool:
        measured = [line for line in lines if name in line or f"val_{name}" in line]
        return all(
            line.get(name) == line["loss"] and line.get(f"val_{name}") == line.get("val_loss") for line in measured
        )

    return ["loss", *(name for name in found if name != "loss" and not the_loss(name))]


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
