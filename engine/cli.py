"""``python -m engine`` (or ``engine``): ``run`` a job, print its resolved ``config``, list the
``plugins``; plugins add the other subcommands (`register_commands`: evaluate, predict, export,
runs, plot, ...)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn, TextIO

import pluggy

from .checks import setup_error
from .components import CORE_KINDS
from .config import Reference, merged_job, references
from .errors import ConfigError, EngineError, Interrupted, one_line, suggest
from .hookspecs import SETUP_CHAIN
from .plugins import OWN_DISTRIBUTION, Plugins, make_plugins
from .schema import dump_toml
from .start import setup

Handler = Callable[[argparse.Namespace], int]
Wrapper = Callable[[argparse.Namespace, Handler], int]


class Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error in one line like every other error (argparse prints
    the whole usage block first); ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (--help shows the usage)\n")


class Commands:
    """The subcommands of ``python -m engine``, as `register_commands` receives them to add to."""

    def __init__(self, subparsers: Any) -> None:
        self.subparsers = subparsers
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE",
            help="load a plugin module (dotted name or path/to/file.py); repeatable",
        )
        self.common.add_argument(
            "--block",
            action="append",
            default=[],
            metavar="NAME",
            help="do not load the plugin NAME (as `python -m engine plugins` lists it); repeatable",
        )
        self.common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
        self.job = argparse.ArgumentParser(add_help=False)
        self.job.add_argument("job", nargs="?", help="TOML job file (default: the built-in linear-regression job)")
        self.job.add_argument(
            "--set",
            action="append",
            default=[],
            dest="overrides",
            metavar="SECTION.KEY=VALUE",
            help="override a setting; the value is read as TOML (5, 0.1, true, [64, 64], adam)",
        )
        self.job.add_argument(
            "--no-imports",
            action="store_true",
            help="refuse a job file that imports code (plugins, module:attr names): for job files from elsewhere",
        )
        # For a command that opens a run directory: a run is data, whose config.toml imports
        # nothing it names unless the user trusts it (engine/saved.py).
        self.opening = argparse.ArgumentParser(add_help=False)
        self.opening.add_argument(
            "--trust-run",
            action="store_true",
            help="import the code the run's config.toml names (plugin modules and files, module:factory "
            "components); without it, such a run is refused",
        )
        self.parsers: dict[str, argparse.ArgumentParser] = {}
        self.handlers: dict[str, Handler] = {}

    def add(
        self, name: str, handler: Handler, help: str, *, job: bool = False, opens_run: bool = False
    ) -> argparse.ArgumentParser:
        """A subcommand `name` that ``handler(args)`` runs, returning its exit code. It takes
        ``--plugin``, ``--block`` and ``--debug``; with `job` a job file, ``--set`` and
        ``--no-imports``; with `opens_run` (it opens a run directory) ``--trust-run``. Add its own
        arguments to the parser returned."""
        if name in self.parsers:
            raise ConfigError(f"command {name!r} exists already")
        parents = [self.job, self.common] if job else [self.common]
        parents += [self.opening] if opens_run else []
        self.parsers[name] = self.subparsers.add_parser(name, parents=parents, help=help, description=help)
        self.handlers[name] = handler
        return self.parsers[name]

    def parser(self, name: str) -> argparse.ArgumentParser:
        """The parser of command `name`, to add options to (``--nproc`` of ``run``)."""
        if name not in self.parsers:
            raise ConfigError(f"no command is named {name!r}{suggest(name, self.parsers)}")
        return self.parsers[name]

    def wrap(self, name: str, wrapper: Wrapper) -> None:
        """Run command `name` through ``wrapper(args, handler)``, which calls ``handler(args)`` or
        does the command its own way (``run --nproc`` starts processes that each run the job)."""
        self.parser(name)  # one that exists
        handler = self.handlers[name]
        self.handlers[name] = lambda args: wrapper(args, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit code: 0, 2 for usage and config errors (nothing was created), 1
    for a failure during training, 128 + N when stopped by signal N. Errors are one line on
    stderr; ``--debug`` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early, _ = early_options().parse_known_args(argv)
    with quiet_on_closed_pipe():
        try:
            top, commands = parser(make_plugins(early.plugin, early.block))
        except EngineError as error:
            return report(error, f"error: {error}", error.exit_code, early.debug)
        args = top.parse_args(argv)
        args.argv = argv  # the command line as given, for a command that starts it again (run --nproc)
        return exit_code_of(commands.handlers[args.command], args)


def early_options() -> argparse.ArgumentParser:
    """The options that decide which plugins load, read before the plugins add their commands."""
    early = Parser(add_help=False)
    early.add_argument("--plugin", action="append", default=[])
    early.add_argument("--block", action="append", default=[])
    early.add_argument("--debug", action="store_true")
    return early


def parser(plugins: Plugins) -> tuple[argparse.ArgumentParser, Commands]:
    """The command line: the core's commands, then every plugin's."""
    top = Parser(prog="python -m engine", description="A plugin-based PyTorch training engine.")
    top.add_argument("--version", action="version", version=f"{OWN_DISTRIBUTION} {own_version()}")
    commands = Commands(top.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    run = commands.add("run", run_command, "train a job", job=True, opens_run=True)
    run.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue a run from its last checkpoint (its config.toml is the job unless one is given); "
        "auto: continue the run named by run_name if it has a checkpoint, else start it",
    )
    run.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: let the run continue with another value of KEY (a setting or a section), "
        "which its summary records; repeatable",
    )
    run.add_argument("--quiet", action="store_true", help="print nothing but errors (no epoch lines, no progress bar)")
    commands.add(
        "config",
        config_command,
        "a dry run: list the code the job imports, build everything, check it on a sample of the data, "
        "and print the resolved config (nothing is trained or written)",
        job=True,
    )
    commands.add("plugins", plugins_command, "list plugins, their hooks (in call order) and components")
    try:
        plugins.hook.register_commands(commands=commands)
    except Exception as error:  # one line naming the plugin, exit 2, as in the setup chain
        raise setup_error(plugins, error) from error
    return top, commands


def own_version() -> str:
    try:
        return version(OWN_DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed)"


def exit_code_of(handler: Handler, args: argparse.Namespace) -> int:
    """The command run, its errors reported in one line: the exit code (see `main`)."""
    try:
        return handler(args)
    except EngineError as error:
        if not shown(error):  # another process of the run prints it
            return error.exit_code
        return report(error, f"error: {error}", error.exit_code, args.debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a defect that escaped every check: still one line, not a traceback
        return report(error, f"error: internal error: {one_line(error)} (--debug shows where)", 1, args.debug)


def run_command(args: argparse.Namespace) -> int:
    trainer = setup(
        args.job,
        overrides=args.overrides,
        plugins=args.plugin,
        blocked=args.block,
        resume=args.resume,
        imports=not args.no_imports,
        trust=args.trust_run,
        allow_changes=args.allow_change,
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
            trusted = " --trust-run" if references(trainer.config.to_dict()) else ""  # its config names code
            resume = f"python -m engine run --resume {trainer.run_dir}{trusted}"
            print(f"{interrupted}; continue with: {resume}", file=sys.stderr)
        return interrupted.exit_code
    return 0


def config_command(args: argparse.Namespace) -> int:
    # What the job will import is listed before anything is imported.
    job, _ = merged_job(args.job, args.overrides)
    print(describe_references(references(job), args.plugin), end="")
    trainer = setup(
        args.job, overrides=args.overrides, plugins=args.plugin, blocked=args.block, imports=not args.no_imports
    )
    print(dump_toml(trainer.config), end="")
    return 0


def plugins_command(args: argparse.Namespace) -> int:
    print(describe_plugins(make_plugins(args.plugin, args.block)))
    return 0


def report(error: BaseException, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(error)
    # One line, whatever the message quotes (another library's message may span several).
    print("; ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
    return code


def shown(error: EngineError) -> bool:
    """Whether this process prints `error`. Of a run's processes, the one whose error came first
    does (`error.shown`); an error every process meets alike, before they join (in the config), is
    printed by rank 0 alone (the RANK that torch.distributed's launchers set)."""
    return error.shown if error.shown is not None else os.environ.get("RANK", "0") == "0"


def describe_references(found: Sequence[Reference], plugins: Sequence[str]) -> str:
    """The code a job imports and calls, as TOML comments (the printed config stays TOML)."""
    if not found and not plugins:
        return "# This job imports no code beyond the installed plugins.\n"
    lines = ["# This job imports and calls code; trust it as you would a script (--no-imports refuses a job file's):"]
    lines += [f"#   --plugin {plugin}" for plugin in plugins]
    lines += [f"#   {item.key} = {json.dumps(item.value)}" + ("  (--set)" if item.given else "") for item in found]
    return "\n".join(lines) + "\n"


def describe_plugins(plugins: Plugins) -> str:
    """Every plugin with its origin, hooks and components; the essential ones; the setup chain;
    each hook's call order."""
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
    lines.append(f"essential (cannot be blocked): {', '.join(sorted(plugins.essential)) or '-'}")
    lines.append("setup chain (a component kind: its default, from which plugins; a hook: its call order):")
    for link in SETUP_CHAIN:
        if link in plugins.components or link in CORE_KINDS:
            table = plugins.components.get(link, {})
            providers = ", ".join(sorted({component.plugin for component in table.values()})) or "none"
            lines.append(f"  {link}: component {plugins.default(link) or 'none chosen'} (from {providers})")
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
