"""After training, from a run directory alone: ``evaluate`` measures a run's model on labelled
data, ``predict`` runs it on new inputs, ``export`` writes it in a format a serving stack loads,
checked against eager. Each starts from `engine.load`'s model (raw inputs in, on the CPU) and runs
on eager PyTorch or on a verified export (``--backend``).

Export formats are components of the kind ``export`` (`engine.ExportFormat`), each its own plugin;
files to read or write are handled by components named after the file's suffix. From Python:
``engine_plugins.inference.predict``, ``evaluate``, ``export`` and ``load_backend``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import engine

from .backends import Backend, backend_of, load_backend
from .exporting import ExportReport, Run, export, writable
from .serving import (
    check_batch_size,
    evaluate,
    evaluated,
    predict,
    predictions,
    predictions_writer,
    read_inputs,
    write_evaluation,
)

__all__ = ["Backend", "ExportReport", "evaluate", "export", "load_backend", "predict"]


@engine.hookimpl
def register_commands(commands: engine.Commands) -> None:
    helps = {
        "evaluate": "the loss and metrics of a run's model on labelled data",
        "predict": "a run's predictions for the inputs of a file",
        "export": "export a run's model, checked against eager",
    }
    for name, handler in (("evaluate", evaluate_command), ("predict", predict_command), ("export", export_command)):
        parser = commands.add(name, handler, helps[name], opens_run=True)
        run_options(parser)
        if name != "export":
            served_options(parser)
    predict = commands.parser("predict")
    predict.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write them; its suffix names the component that writes it",
    )
    predict.add_argument("--batch-size", type=int, default=1024, metavar="N", help="samples per forward pass")
    predict.add_argument(
        "--pass-non-finite",
        action="store_true",
        help="predict inputs that hold NaN or inf too (their predictions are NaN); without it they are refused",
    )
    exporter = commands.parser("export")
    exporter.add_argument(
        "--format", required=True, metavar="FORMAT", help="an export component (`python -m engine plugins` lists them)"
    )
    exporter.add_argument("--out", metavar="PATH", help="default: RUN_DIR/exports/<which>-<format><suffix>")


def run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (runs/<name>)")
    parser.add_argument(
        "--which", default="final", metavar="final|best|last", help="model.pt, the best or the latest checkpoint"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="a setting of the file reader ([data]), the writer ([predictions]) or the format ([export])",
    )


def served_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, metavar="FILE", help="a data file; its suffix names the data component that reads it"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        metavar="NAME",
        help="auto (the fastest verified one this machine can run), eager, or an export format",
    )


def evaluate_command(args: argparse.Namespace) -> int:
    run = Run.open(args.run_dir, args.which, args.plugin, args.block, args.trust_run)
    result, backend = evaluated(run, Path(args.data), args.backend, args.overrides)
    print(f"backend: {backend.description}", file=sys.stderr)
    write_evaluation(result)
    if result.get("non_finite"):
        print(f"warning: not finite on this data (null below): {', '.join(result['non_finite'])}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    out = writable(Path(args.out), "--out")
    check_batch_size(args.batch_size)
    run = Run.open(args.run_dir, args.which, args.plugin, args.block, args.trust_run)
    writer = predictions_writer(run, out, args.overrides)
    x = read_inputs(run, args.data, args.overrides, pass_non_finite=args.pass_non_finite)
    backend = backend_of(run, args.backend)
    print(f"backend: {backend.description}", file=sys.stderr)
    columns = predictions(backend, x, args.batch_size)
    try:
        writer(out, {key: value.numpy() for key, value in columns.items()})
    except OSError as error:
        raise engine.TrainingError(f"--out '{out}': cannot write it: {engine.one_line(error)}") from None
    print(f"{len(x)} predictions ({', '.join(columns)}): {args.out}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    report = export(
        args.run_dir,
        args.format,
        out=args.out,
        which=args.which,
        overrides=args.overrides,
        plugins=args.plugin,
        blocked=args.block,
        trust=args.trust_run,
    )
    print(report.describe())
    return 0
