"""``python -m engine``: run a job, print its resolved config, list the plugins."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence

import pluggy

from .config import CORE_KINDS, Reference, dump_toml, merged_job, references
from .errors import EngineError, Interrupted, one_line
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
    job.add_argument(
        "--no-imports",
        action="store_true",
        help="refuse a job file that imports code (plugins, module:attr names): for job files from elsewhere",
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
    commands.add_parser(
        "config",
        parents=[job, common],
        help="a dry run: list the code the job imports, build everything, check it on a sample of the data, "
        "and print the resolved config (nothing is trained or written)",
    )
    commands.add_parser("plugins", parents=[common], help="list plugins, their hooks (in call order) and components")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit code: 0, 2 for usage and config errors (nothing was created), 1
    for a failure during training, 128 + N when stopped by signal N. Errors are one line on
    stderr; ``--debug`` adds the traceback."""
    args = parser().parse_args(argv)
    try:
        return command(args)
    except EngineError as error:
        return report(error, f"error: {error}", error.exit_code, args.debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a defect that escaped every check: still one line, not a traceback
        return report(error, f"error: internal error: {one_line(error)} (--debug shows where)", 1, args.debug)


def command(args: argparse.Namespace) -> int:
    if args.command == "plugins":
        print(describe_plugins(make_plugins(args.plugin, args.block)))
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
            trainer.fit()
        except Interrupted as interrupted:
            print(f"{interrupted}; continue with: python -m engine run --resume {trainer.run_dir}", file=sys.stderr)
            return interrupted.exit_code
    return 0


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
