"""``python -m engine run ... --nproc N [--max-restarts K]``: the run's processes started by torch's
launcher API on this machine, as ``torchrun --standalone --nproc-per-node N`` would."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import engine


def add_options(commands: engine.Commands) -> None:
    run = commands.parser("run")
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train in N processes on this machine, started by torch's launcher "
        "(as `torchrun --standalone --nproc-per-node N -m engine run ...` would)",
    )
    run.add_argument(
        "--max-restarts",
        type=int,
        metavar="K",
        help="with --nproc: restart the processes up to K times after one fails (torchrun's elastic agent); "
        "with resume = 'auto' a restarted run continues from its last checkpoint",
    )
    commands.wrap("run", launch_if_asked)


def launch_if_asked(args: argparse.Namespace, run: Any) -> int:
    """``run --nproc N``: the same command in N processes of this machine, started by torch's
    launcher API (``torch.distributed.run``, what torchrun is); its exit code is the first failed
    process's, or the signal's that stopped the launcher (after its processes stopped cleanly).
    Without ``--nproc``, the run itself."""
    if args.nproc is None:
        if args.max_restarts is not None:
            raise engine.ConfigError("--max-restarts: only with --nproc (under torchrun, its own --max-restarts)")
        return run(args)
    if args.nproc < 1:
        raise engine.ConfigError(f"--nproc: expected 1 or more processes, got {args.nproc}")
    if (args.max_restarts or 0) < 0:
        raise engine.ConfigError(f"--max-restarts: expected 0 or more, got {args.max_restarts}")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise engine.ConfigError(
            "--nproc: this process was started by a launcher (torchrun) already; leave --nproc out"
        )
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The launcher logs the threads it sets, each failed process and each signal it sends, each of
    # its modules at its own level: the processes say what happened themselves, in one line.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    command = ["--standalone", f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts or 0}"]
    command += ["--module", "engine", *without_launcher_options(args.argv)]
    try:
        torchrun.run(torchrun.parse_args(command))
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -N: killed by signal N
    except SignalException as signalled:
        return 128 + signalled.sigval
    except Exception as error:
        raise engine.EngineError(f"--nproc: torch's launcher failed: {engine.one_line(error)}") from error
    return 0


def without_launcher_options(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` and ``--max-restarts K``: what each process runs."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--nproc", "--max-restarts"):
            skip = True
        elif not argument.startswith(("--nproc=", "--max-restarts=")):
            kept.append(argument)
    return kept
