"""``python -m engine``: run a job, print its resolved config, list the plugins."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import pluggy

from .config import CORE_KINDS, dump_toml, load_config
from .errors import ConfigError, EngineError, Interrupted, one_line
from .hookspecs import SETUP_CHAIN
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
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine, started by torch's launcher "
        "(as `torchrun --standalone --nproc-per-node N -m engine run ...` would)",
    )
    commands.add_parser("config", parents=[job, common], help="print the resolved config, every default filled in")
    commands.add_parser("plugins", parents=[common], help="list plugins, their hooks (in call order) and components")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        if args.command == "run" and args.nproc is not None:
            return launch(args.nproc, without_nproc(argv))
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
                if shown(interrupted):
                    resume = f"python -m engine run --resume {trainer.run_dir}"
                    print(f"{interrupted}; continue with: {resume}", file=sys.stderr)
                return interrupted.exit_code
        return 0
    except EngineError as error:
        if shown(error):
            if args.debug:
                traceback.print_exception(error)
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
