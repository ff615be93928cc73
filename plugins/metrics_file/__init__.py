"""The metrics' history: ``metrics.jsonl`` in the run directory, one JSON line per logging point,
and what is read from it: ``curves.png`` at the end of a run, ``python -m engine plot`` (runs'
curves overlaid) and ``python -m engine runs`` (a table of a folder of runs).

Each line is `on_log`'s metrics with ``time``, the run's training seconds so far; it reaches the
file whole or not at all (a failed write is cut back to the last whole line and ends the run). A
resumed run cuts the file back to where its checkpoint was taken, so no line is duplicated or
lost. Of a run's processes, rank 0 alone writes it (the metrics are every process's). The curves
need matplotlib (the ``plot`` extra); ``log.curves = false`` skips the run's; drawing them costs
about a second, once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import engine

from .curves import METRICS, plot
from .table import COLUMNS, runs_table


@dataclass(frozen=True)
class Settings:
    curves: Annotated[bool, engine.Changeable()] = True  # curves.png in the run directory when matplotlib is installed


class MetricsFile:
    def __init__(self) -> None:
        self.file: int | None = None  # the open metrics.jsonl
        self.offset = 0  # its length after the last whole line

    @engine.hookimpl
    def register_settings(self):
        return {"log": Settings}

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
    def on_run_end(self, trainer: engine.TrainerView) -> None:
        if self.file is None:
            return  # the run never started, or not rank 0
        os.close(self.file)
        self.file = None
        if trainer.config["log"]["curves"] and importlib.util.find_spec("matplotlib") is not None:
            plot([trainer.run_dir], trainer.run_dir / "curves.png")

    @engine.hookimpl
    def register_commands(self, commands: engine.Commands) -> None:
        table = commands.add("runs", runs_command, "a table of the runs in a runs directory")
        table.add_argument("runs_dir", nargs="?", default="runs", help="the runs directory (default: runs)")
        table.add_argument(
            "--sort", default="started", choices=COLUMNS, help="the column to sort by (default: started)"
        )
        table.add_argument("--reverse", action="store_true", help="sort in descending order")
        curves = commands.add("plot", plot_command, "the loss and metric curves of runs, overlaid, as a PNG")
        curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
        curves.add_argument("--out", default="curves.png", help="the PNG file to write (default: curves.png)")


def runs_command(args: argparse.Namespace) -> int:
    print(runs_table(args.runs_dir, args.sort, descending=args.reverse))
    return 0


def plot_command(args: argparse.Namespace) -> int:
    print(f"Curves: {plot(args.run_dirs, args.out)}")
    return 0
