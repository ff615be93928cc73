"""What a sweep shows: a line per finished trial, the table of trials sorted by the metric (at the
end, and with ``--status`` at any time), ``best.toml`` and the plots."""

from __future__ import annotations

import math
import os
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import engine

from .space import toml_text
from .study import JOURNAL, STUDY, Row, need_optuna, rows, storage, trial_name

if TYPE_CHECKING:
    from . import Plan

BEST = "best.toml"
SWEEP_LOCK = ".sweep.lock"  # held by the sweep's process, with its pid inside
PLOTS = {"history.png": "plot_optimization_history", "importance.png": "plot_param_importances"}


def ranked(found: Sequence[Row], direction: str) -> list[Row]:
    """Completed trials by the metric, best first; then the pruned ones likewise; then the
    running, the interrupted and the failed, by number."""
    sign = -1 if direction == "maximize" else 1
    order = {"completed": 0, "pruned": 1, "running": 2, "interrupted": 2, "failed": 3}

    def key(row: Row) -> tuple[int, float, int]:
        value = row.value if row.value is not None and math.isfinite(row.value) else math.inf * sign
        return order[row.status], sign * value, row.number

    return sorted(found, key=key)


def best(found: Sequence[Row], direction: str) -> Row | None:
    completed = [row for row in found if row.status == "completed" and row.value is not None]
    return ranked(completed, direction)[0] if completed else None


def shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def parameters(plan: Plan, row: Row) -> list[str]:
    """The trial's value of each dimension, as the table shows it."""
    values = []
    for dimension in plan.dimensions:
        if dimension.key not in row.parameters:
            values.append("-")
            continue
        value = dimension.value(row.parameters[dimension.key])
        values.append(
            shown(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else toml_text(value)
        )
    return values


def table(plan: Plan, found: Sequence[Row]) -> str:
    """The trials, sorted by the metric: status, metric, epochs, training time, then the values."""
    columns = ["trial", "status", plan.settings["metric"], "epochs", "time_s", *(d.key for d in plan.dimensions)]
    cells = [
        [row.name, row.status, shown(row.value), shown(row.epochs), shown(row.seconds), *parameters(plan, row)]
        for row in ranked(found, plan.direction)
    ]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [columns, *cells]]
    lines += [f"{row.name} failed: {row.error}" for row in sorted(found, key=lambda row: row.number) if row.error]
    return "\n".join(lines)


def heading(plan: Plan, found: Sequence[Row]) -> str:
    """One line: how far the sweep is, what it optimises, and its best trial so far."""
    counts = {status: sum(row.status == status for row in found) for status in ("completed", "pruned", "failed")}
    finished = sum(counts.values())
    parts = [f"{count} {status}" for status, count in counts.items() if count]
    unfinished = len(found) - finished
    if unfinished:
        parts.append(f"{unfinished} {found_status(found)}")
    metric = plan.settings["metric"]
    line = f"sweep {plan.directory}: {finished} of {plan.target} trials finished ({', '.join(parts) or 'none yet'})"
    line += f"; {metric}, {plan.direction}"
    top = best(found, plan.direction)
    return line + (f"; best {top.name}, {metric} {shown(top.value)}" if top is not None else "")


def found_status(found: Sequence[Row]) -> str:
    return "interrupted" if any(row.status == "interrupted" for row in found) else "running"


def progress(plan: Plan, row: Row, found: Sequence[Row]) -> str:
    """The line a finished trial prints."""
    finished = sum(other.status in ("completed", "pruned", "failed") for other in found)
    width = len(str(plan.target))
    metric = plan.settings["metric"]
    values = ", ".join(f"{d.key}={value}" for d, value in zip(plan.dimensions, parameters(plan, row)))
    if row.status == "failed":
        said = f"failed: {row.error}"
    else:
        ended = f"pruned at epoch {row.epochs}" if row.status == "pruned" else f"completed, {row.epochs} epochs"
        said = f"{ended}, {metric} {shown(row.value)} in {shown(row.seconds)} s"
    top = best(found, plan.direction)
    leader = f"; best {top.name}, {shown(top.value)}" if top is not None else ""
    return f"[{finished:>{width}}/{plan.target}] {row.name} {said} ({values}){leader}"


def status(plan: Plan) -> str:
    """``--status``: the heading and the table, read from the study while a sweep may be running
    it (reading takes no lock)."""
    if not (plan.directory / JOURNAL).is_file():
        raise engine.ConfigError(f"sweep '{plan.directory}' has not started (it has no {JOURNAL})")
    optuna = need_optuna()
    study = optuna.load_study(study_name=STUDY, storage=storage(plan.directory))
    plan.direction = study.direction.name.lower()  # the study's, whatever auto says now
    found = rows(study, plan.directory)
    if not sweep_alive(plan.directory):
        for row in found:
            row.status = "interrupted" if row.status == "running" else row.status
    return heading(plan, found) + "\n" + table(plan, found)


def sweep_alive(directory: Path) -> bool:
    """Whether the process whose pid the sweep's lock file holds is alive (on this machine)."""
    try:
        pid = int((directory / SWEEP_LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_best(plan: Plan, row: Row) -> Path:
    """The best trial's config.toml as ``best.toml``, to train again where a run of the job would
    go: `engine run best.toml` (a new run, named by the time it starts)."""
    config = tomllib.loads((plan.directory / trial_name(row.number) / engine.runs.CONFIG).read_text(encoding="utf-8"))
    config["run_name"], config["runs_dir"] = "", plan.config["runs_dir"]
    metric = plan.settings["metric"]
    header = (
        f"# The best trial of sweep {plan.directory}: {row.name}, {metric} {shown(row.value)}.\n"
        "# Its resolved config; `python -m engine run best.toml` trains it again.\n"
    )
    path = plan.directory / BEST
    engine.runs.write_text(path, header + engine.dump_toml(config))
    return path


def plots(study: Any, directory: Path, metric: str) -> list[str]:
    """history.png and importance.png, Optuna's matplotlib figures; a line for each, saying where
    it is or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, no screen
        import matplotlib.pyplot as pyplot
        from optuna.visualization import matplotlib as figures
    except ImportError:
        return ["Plots: none (matplotlib is not installed: pip install 'torch-plugin-engine[sweep]')"]
    said = []
    for name, function in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
                axes = getattr(figures, function)(study, target_name=metric)
                with engine.runs.replacing(directory / name) as temporary:
                    axes.figure.savefig(temporary, format="png", dpi=80, bbox_inches="tight")
            said.append(f"Plot: {directory / name}")
        except Exception as error:  # too few trials for it, most often
            said.append(f"Plot: {name} not drawn ({engine.one_line(error)})")
        finally:
            pyplot.close("all")
    return said
