"""``python -m engine``: run a job, print its resolved config, list the plugins; after training,
evaluate, predict with and export a run's model."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pluggy

from .config import CORE_KINDS, dump_toml, load_config
from .errors import EngineError, Interrupted
from .hookspecs import SETUP_CHAIN
from .inference import (
    Run,
    evaluate,
    export,
    load_backend,
    predictions,
    read_inputs,
    write_evaluation,
    write_predictions,
)
from .loop import setup
from .plugins import Plugins, make_plugins


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="load a plugin module (dotted name or path/to/file.py); repeatable",
    )
    common.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NAME",
        help="do not load the plugin NAME (as `python -m engine plugins` lists it); repeatable",
    )
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("job", nargs="?", help="TOML job file (default: the built-in linear-regression job)")
    job.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="override a setting; the value is read as TOML (5, 0.1, true, [64, 64], adam)",
    )
    top = argparse.ArgumentParser(prog="python -m engine", description="A plugin-based PyTorch training engine.")
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[job, common], help="train a job")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue a run from its latest checkpoint (its config.toml is the job unless one is given); "
        "auto: continue the run named by run_name if it has a checkpoint, else start it",
    )
    commands.add_parser("config", parents=[job, common], help="print the resolved config, every default filled in")
    commands.add_parser("plugins", parents=[common], help="list plugins, their hooks (in call order) and components")
    add_after_training(commands, common)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in AFTER_TRAINING:
            return AFTER_TRAINING[args.command](args)
        if args.command == "plugins":
            print(describe_plugins(make_plugins(args.plugin, args.block)))
        elif args.command == "config":
            config, _ = load_config(args.job, args.overrides, args.plugin, args.block)
            print(dump_toml(config), end="")
        else:
            trainer = setup(
                args.job, overrides=args.overrides, plugins=args.plugin, blocked=args.block, resume=args.resume
            )
            try:
                trainer.fit()
            except Interrupted as interrupted:
                print(f"{interrupted}; continue with: python -m engine run --resume {trainer.run_dir}", file=sys.stderr)
                return interrupted.exit_code
        return 0
    except EngineError as error:
        if args.debug:
            traceback.print_exception(error)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --- after training: evaluate, predict, export ---------------------------------------------------


def add_after_training(commands: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands that work from a run directory alone."""
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (runs/<name>)")
    run.add_argument(
        "--which",
        choices=("final", "best", "last"),
        default="final",
        help="model.pt, the best or the latest checkpoint",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="a setting of the file reader ([data]), the writer ([predictions]) or the format ([export])",
    )
    served = argparse.ArgumentParser(add_help=False)
    served.add_argument(
        "--data", required=True, metavar="FILE", help="a data file; its suffix names the data component that reads it"
    )
    served.add_argument(
        "--backend",
        default="auto",
        metavar="NAME",
        help="auto (the fastest verified one this machine can run), eager, or an export format",
    )
    parents = [run, served, common]
    commands.add_parser("evaluate", parents=parents, help="the loss and metrics of a run's model on labelled data")
    predict = commands.add_parser("predict", parents=parents, help="a run's predictions for the inputs of a file")
    predict.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write them; its suffix names the predictions component that writes it",
    )
    predict.add_argument("--batch-size", type=int, default=1024, metavar="N", help="samples per forward pass")
    exporter = commands.add_parser("export", parents=[run, common], help="export a run's model, checked against eager")
    exporter.add_argument(
        "--format", required=True, metavar="FORMAT", help="an export component (`python -m engine plugins` lists them)"
    )
    exporter.add_argument("--out", metavar="PATH", help="default: RUN_DIR/exports/<which>-<format><suffix>")


def evaluate_command(args: argparse.Namespace) -> int:
    backend = load_backend(args.run_dir, args.which, args.backend, plugins=args.plugin, blocked=args.block)
    print(f"backend: {backend.description}", file=sys.stderr)
    result = evaluate(
        args.run_dir,
        args.data,
        which=args.which,
        backend=backend,
        overrides=args.overrides,
        plugins=args.plugin,
        blocked=args.block,
    )
    write_evaluation(result)
    print(json.dumps(result))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    run = Run.open(args.run_dir, args.which, args.plugin, args.block)
    x = read_inputs(run, args.data, args.overrides)
    backend = load_backend(args.run_dir, args.which, args.backend, plugins=args.plugin, blocked=args.block)
    print(f"backend: {backend.description}", file=sys.stderr)
    columns = predictions(backend, x, args.batch_size)
    write_predictions(run, columns, args.out, args.overrides)
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
    )
    print(report.describe())
    return 0


AFTER_TRAINING: dict[str, Callable[[argparse.Namespace], int]] = {
    "evaluate": evaluate_command,
    "predict": predict_command,
    "export": export_command,
}


def describe_plugins(plugins: Plugins) -> str:
    """Every plugin with its origin, hooks and components; the setup chain; each hook's call order."""
    lines = ["plugins (name, origin, hooks, components):"]
    for name in plugins.names():
        plugin = plugins.pm.get_plugin(name)
        hooks = sorted(caller.name for caller in plugins.pm.get_hookcallers(plugin) or ())
        provided = [
            f"{kind} {component.name}"
            for kind, table in sorted(plugins.components.items())
            for component in table.values()
            if component.plugin == name
        ]
        lines.append(f"  {name}  [{plugins.sources.get(name, '?')}]")
        lines.append(f"      hooks: {', '.join(hooks) or '-'}")
        if provided:
            lines.append(f"      provides: {', '.join(provided)}")
    lines.append("setup chain (a component kind: its default, from which plugins; a hook: its call order):")
    for link in SETUP_CHAIN:
        if link in plugins.components or link in CORE_KINDS:
            table = plugins.components.get(link, {})
            default = plugins.settings.get(link, {}).get("name")
            providers = ", ".join(sorted({component.plugin for component in table.values()})) or "none"
            chosen = default.default if default is not None else "none chosen"
            lines.append(f"  {link}: component {chosen} (from {providers})")
        else:
            lines.append(f"  {link}: {_order(getattr(plugins.hook, link)) or '-'}")
    lines.append("hook call order:")
    for name in sorted(dir(plugins.hook)):
        caller = getattr(plugins.hook, name)
        if isinstance(caller, pluggy.HookCaller) and caller.get_hookimpls():
            lines.append(f"  {name}: {_order(caller)}")
    return "\n".join(lines)


def _order(caller: pluggy.HookCaller) -> str:
    return " -> ".join(impl.plugin_name + _marks(impl) for impl in reversed(caller.get_hookimpls()))


def _marks(impl: pluggy.HookImpl) -> str:
    marks = [mark for mark in ("tryfirst", "trylast", "wrapper", "hookwrapper") if getattr(impl, mark)]
    return f" ({', '.join(marks)})" if marks else ""
