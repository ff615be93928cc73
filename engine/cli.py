"""``python -m engine`` (or ``engine``): run a job, print its resolved config, list the plugins,
table and plot runs; after training, evaluate, predict with and export a run's model."""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import pluggy

from .config import CORE_KINDS, Reference, dump_toml, merged_job, references
from .errors import ConfigError, EngineError, Interrupted, one_line
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
from .plugins import OWN_DISTRIBUTION, Plugins, make_plugins
from .report import COLUMNS, plot, runs_table


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
    job.add_argument(
        "--no-imports",
        action="store_true",
        help="refuse a job file that imports code (plugins, module:attr names): for job files from elsewhere",
    )
    top = argparse.ArgumentParser(prog="python -m engine", description="A plugin-based PyTorch training engine.")
    top.add_argument("--version", action="version", version=f"{OWN_DISTRIBUTION} {own_version()}")
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[job, common], help="train a job")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue a run from its latest checkpoint (its config.toml is the job unless one is given); "
        "auto: continue the run named by run_name if it has a checkpoint, else start it",
    )
    run.add_argument("--quiet", action="store_true", help="print nothing but errors (no epoch lines, no progress bar)")
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine, started by torch's launcher "
        "(as `torchrun --standalone --nproc-per-node N -m engine run ...` would)",
    )
    commands.add_parser(
        "config",
        parents=[job, common],
        help="a dry run: list the code the job imports, build everything, check it on a sample of the data, "
        "and print the resolved config (nothing is trained or written)",
    )
    commands.add_parser("plugins", parents=[common], help="list plugins, their hooks (in call order) and components")
    table = commands.add_parser("runs", parents=[common], help="a table of the runs in a runs directory")
    table.add_argument("runs_dir", nargs="?", default="runs", help="the runs directory (default: runs)")
    table.add_argument("--sort", default="started", choices=COLUMNS, help="the column to sort by (default: started)")
    table.add_argument("--reverse", action="store_true", help="sort in descending order")
    curves = commands.add_parser(
        "plot", parents=[common], help="the loss and metric curves of runs, overlaid, as a PNG"
    )
    curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    curves.add_argument("--out", default="curves.png", help="the PNG file to write (default: curves.png)")
    add_after_training(commands, common)
    return top


def own_version() -> str:
    try:
        return version(OWN_DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit code: 0, 2 for usage and config errors (nothing was created), 1
    for a failure during training, 128 + N when stopped by signal N. Errors are one line on
    stderr; ``--debug`` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    with quiet_on_closed_pipe():
        code = exit_code_of(args, argv)
    release_process_group()  # after the error, and the traceback that holds the run, are gone
    return code


def exit_code_of(args: argparse.Namespace, argv: list[str]) -> int:
    """The command run, its errors reported in one line: the exit code (see `main`)."""
    try:
        if args.command == "run" and args.nproc is not None:
            return launch(args.nproc, without_nproc(argv))
        return command(args)
    except EngineError as error:
        if not shown(error):  # another process of the run prints it
            return error.exit_code
        return report(error, f"error: {error}", error.exit_code, args.debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a defect that escaped every check: still one line, not a traceback
        return report(error, f"error: internal error: {one_line(error)} (--debug shows where)", 1, args.debug)


def command(args: argparse.Namespace) -> int:
    if args.command in AFTER_TRAINING:
        return AFTER_TRAINING[args.command](args)
    if args.command == "plugins":
        print(describe_plugins(make_plugins(args.plugin, args.block)))
    elif args.command == "runs":
        print(runs_table(args.runs_dir, args.sort, descending=args.reverse))
    elif args.command == "plot":
        print(f"Curves: {plot(args.run_dirs, args.out)}")
    elif args.command == "config":
        # What the job will import is listed before anything is imported.
        job, _ = merged_job(args.job, args.overrides)
        print(describe_references(references(job), args.plugin), end="")
        trainer = setup(
            args.job, overrides=args.overrides, plugins=args.plugin, blocked=args.block, imports=not args.no_imports
        )
        print(dump_toml(trainer.config), end="")
    else:
        trainer = setup(
            args.job,
            overrides=args.overrides,
            plugins=args.plugin,
            blocked=args.block,
            resume=args.resume,
            imports=not args.no_imports,
        )
        try:
            with contextlib.ExitStack() as stack:
                if args.quiet:  # no terminal for the run: no lines, and no progress bar either
                    devnull = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(devnull))
                    stack.enter_context(contextlib.redirect_stderr(devnull))
                trainer.fit()
        except Interrupted as interrupted:
            if shown(interrupted):
                resume = f"python -m engine run --resume {trainer.run_dir}"
                print(f"{interrupted}; continue with: {resume}", file=sys.stderr)
            return interrupted.exit_code
    return 0


def release_process_group() -> None:
    """Under a launcher (torchrun), collect the finished run's objects while the interpreter is
    alive. A data-parallel run's DDP module holds torch.distributed's gloo group through its
    reducer, and the Trainer's reference cycles keep it until the garbage collector runs:
    collected during interpreter shutdown instead, gloo aborted a process now and then after a
    completed run ("terminate called without an active exception", exit 134; 3 runs in 20 of a job
    with a test split, none in 2 x 40 since). A single process skips the collection (100 ms in a
    large process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        gc.collect()


def report(error: BaseException, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    # One line, whatever the message quotes (another library's message may span several).
    print("; ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
    return code


def describe_references(found: Sequence[Reference], plugins: Sequence[str]) -> str:
    """The code a job imports and calls, as TOML comments (the printed config stays TOML)."""
    if not found and not plugins:
        return "# This job imports no code beyond the installed plugins.\n"
    lines = ["# This job imports and calls code; trust it as you would a script (--no-imports refuses a job file's):"]
    lines += [f"#   --plugin {plugin}" for plugin in plugins]
    lines += [f"#   {item.key} = {json.dumps(item.value)}" + ("  (--set)" if item.given else "") for item in found]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def quiet_on_closed_pipe() -> Iterator[None]:
    """Standard output into a pipe that closes (``| head``) goes quietly to /dev/null from then on,
    instead of a BrokenPipeError in whatever was printing; the command goes on to its end."""
    original = sys.stdout
    sys.stdout = ClosedPipeQuiet(original)
    try:
        yield
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        sys.stdout = original


class ClosedPipeQuiet(io.TextIOBase):
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.to_devnull()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def to_devnull(self) -> None:
        # What Python's docs advise for SIGPIPE: point the descriptor at /dev/null, so that the
        # interpreter's own flush at exit does not fail either.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        self.stream = open(os.devnull, "w")  # lives as long as the process


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
    if result.get("not_finite"):
        print(f"warning: not finite on this data (null below): {', '.join(result['not_finite'])}", file=sys.stderr)
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


def shown(error: EngineError) -> bool:
    """Whether this process prints `error`. Of a run's processes, the one whose error came first
    does (`error.shown`); an error every process meets alike, before they join (in the config), is
    printed by rank 0 alone (the launcher's RANK)."""
    return error.shown if error.shown is not None else os.environ.get("RANK", "0") == "0"


def launch(nproc: int, argv: list[str]) -> int:
    """``run --nproc N``: the same command in N processes of this machine, started by torch's
    launcher API (``torch.distributed.run``, what torchrun is); its exit code is the first failed
    process's, or the signal's that stopped the launcher (after its processes stopped cleanly)."""
    if nproc < 1:
        raise ConfigError(f"--nproc: expected 1 or more processes, got {nproc}")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--nproc: this process was started by a launcher (torchrun) already; leave --nproc out")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The launcher logs the threads it sets, each failed process and each signal it sends, each of
    # its modules at its own level: the processes say what happened themselves, in one line.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    launched = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "engine", *argv])
    try:
        torchrun.run(launched)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -N: killed by signal N
    except SignalException as signalled:
        return 128 + signalled.sigval
    except Exception as error:
        raise EngineError(f"--nproc: torch's launcher failed: {one_line(error)}") from error
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N``: what each launched process runs."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


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
