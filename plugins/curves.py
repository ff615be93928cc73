"""``curves.png`` in the run directory at the end of a run (its losses and metrics over the
epochs, read from ``metrics.jsonl``), and ``python -m engine plot``, which draws several runs
overlaid. Only with matplotlib (the ``plot`` extra); ``log.curves = false`` skips the run's file;
drawing costs about a second, once."""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import engine

METRICS = "metrics.jsonl"  # one JSON object per logging point (the metrics_file plugin's)


@dataclass(frozen=True)
class Settings:
    curves: Annotated[bool, engine.Changeable()] = True  # curves.png in the run directory when matplotlib is installed


@engine.hookimpl
def register_settings():
    return {"log": Settings}


@engine.hookimpl
def on_run_end(trainer: engine.TrainerView) -> None:
    if trainer.rank or not trainer.config["log"]["curves"] or importlib.util.find_spec("matplotlib") is None:
        return
    if trainer.run_dir is not None and (trainer.run_dir / METRICS).is_file():
        plot([trainer.run_dir], trainer.run_dir / "curves.png")


@engine.hookimpl
def register_commands(commands: engine.Commands) -> None:
    curves = commands.add("plot", plot_command, "the loss and metric curves of runs, overlaid, as a PNG")
    curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    curves.add_argument("--out", default="curves.png", help="the PNG file to write (default: curves.png)")


def plot_command(args: argparse.Namespace) -> int:
    print(f"Curves: {plot(args.run_dirs, args.out)}")
    return 0


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
