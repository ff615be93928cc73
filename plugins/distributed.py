"""``[distributed]``: data-parallel training over the processes a launcher started (DDP).

``torchrun --standalone --nproc-per-node N -m engine run job.toml``, or ``python -m engine run
job.toml --nproc N`` (the same, started through torch's launcher API), runs the whole job in N
processes. The ``ddp`` component, first in the setup chain, joins them: it initialises
torch.distributed's default process group from the launcher's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with ``backend`` gloo on the CPU and
NCCL on CUDA (``auto``), each process on the GPU of its local rank. Without a launcher, or with
one process, it is None and the run is the single process it always was. Then:

- `wrap_model` wraps the model in ``DistributedDataParallel``, last in the chain: during backward
  DDP replaces every process's gradients with their mean. ``trainer.module`` stays the bare
  model, which is what is saved and exported.
- `wrap_step` runs each batch of an accumulation window but the last under ``no_sync()``: one
  all-reduce per optimizer step.
- The core does the rest through the component's collectives (`engine.Distributed`): each
  process's loaders take its slice of every batch (the global one), the logged losses and the
  validation sums are reduced once per logging point and validation, and rank 0 alone prints
  and writes.
- ``run --nproc N`` (`register_commands`) starts the N processes with torch's launcher API.

A process that fails or is interrupted reports it in the key-value store the processes met in
(torch.distributed's rendezvous; torchrun's own): the first report is the run's error, which the
process that made it prints. The others stop when a collective fails because that process left
it, and take its error (without printing it), so rank 0 writes the failing process's message in
the run's summary and every process exits with its code. `close` leaves the group: a process
that exits without it is aborted by torch's gloo backend ("terminate called without an active
exception").
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import engine

ERROR_KEY = "error"  # in the store: the first error of the run, as JSON
COLLECTED_AT_EXIT: list[object] = []  # gc.collect, once registered with atexit


class DataParallel:
    """Per run: the processes this plugin joined and the DDP module it made."""

    def __init__(self) -> None:
        self.joined: Joined | None = None
        self.ddp: DistributedDataParallel | None = None

    @engine.hookimpl
    def register_components(self):
        return {"distributed": {"ddp": self.join}, "default": {"distributed": "ddp"}}

    @engine.hookimpl
    def register_commands(self, commands: engine.Commands) -> None:
        commands.parser("run").add_argument(
            "--nproc",
            type=int,
            metavar="N",
            help="train data-parallel in N processes on this machine, started by torch's launcher "
            "(as `torchrun --standalone --nproc-per-node N -m engine run ...` would)",
        )
        commands.wrap("run", launch_if_asked)

    def join(self, device: torch.device, backend: Literal["auto", "gloo", "nccl"] = "auto") -> Joined | None:
        """Join the processes of the launcher's run (see the module docstring); None without one."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if dist.is_initialized():
            raise engine.ConfigError(
                "distributed: torch.distributed's process group exists already; the ddp component makes its own"
            )
        self.joined = Joined(device, backend)
        return self.joined

    @engine.hookimpl(trylast=True)  # last, so outermost: DDP averages what the wrappers inside it compute
    def wrap_model(self, model: torch.nn.Module, trainer: engine.TrainerView) -> torch.nn.Module | None:
        if self.joined is None:
            return None
        device = trainer.device
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return self.ddp

    @engine.hookimpl
    def wrap_step(self, step: engine.Step, trainer: engine.TrainerView) -> engine.Step | None:
        if self.ddp is None or trainer.accumulation == 1:
            return None
        no_sync = self.ddp.no_sync

        def step_in_window(batch: engine.Batch, window: engine.Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if window.last:  # DDP all-reduces the gradients the window accumulated
                return step(batch, window)
            with no_sync():
                return step(batch, window)

        return step_in_window


class Joined:
    """The process group of the run (an `engine.Distributed`) and the store its processes met in."""

    def __init__(self, device: torch.device, backend: str) -> None:
        if device.type == "cuda":
            if device.index is not None:
                raise engine.ConfigError(
                    f"device: {device} names one GPU, but each of the run's processes takes the GPU of its "
                    "local rank: set device = 'cuda'"
                )
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        elif backend == "nccl" and device.type != "cuda":
            raise engine.ConfigError(f"distributed.backend: 'nccl' needs CUDA devices; this run's device is {device}")
        store, rank, world_size = next(dist.rendezvous("env://"))
        # The launcher starts a fresh store per attempt (torchrun --max-restarts), but a store that
        # rank 0 hosts outlives a run within its process: forget an earlier run's error.
        self.store = dist.PrefixStore(f"engine/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        if rank == 0:
            self.store.delete_key(ERROR_KEY)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, device_id=device if device.type == "cuda" else None
        )
        self.device, self.rank, self.world_size = device, rank, world_size
        # Collected while the interpreter lives: a DDP module holds the gloo group through its
        # reducer, and the trainer's reference cycles keep it until the garbage collector runs;
        # collected during interpreter shutdown instead, gloo aborted a process now and then after
        # a completed run ("terminate called without an active exception", exit 134).
        if gc.collect not in COLLECTED_AT_EXIT:
            atexit.register(gc.collect)
            COLLECTED_AT_EXIT.append(gc.collect)

    def broadcast(self, value: Any) -> Any:
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def failed(self, error: BaseException) -> BaseException:
        """`error` if it is the run's first (this process shows it), else the one reported first."""
        if isinstance(error, engine.TrainingError) and error.located and not str(error).startswith("rank "):
            error.args = (f"rank {self.rank}, {error}",)
        mine = json.dumps(report(error, self.rank))
        try:
            first = self.store.compare_set(ERROR_KEY, "", mine).decode()
        except Exception:  # the store's host (the launcher, or rank 0) has gone: no one to tell or ask
            first = mine
        if first != mine:
            return from_report(json.loads(first))
        if isinstance(error, engine.EngineError):
            error.shown = True
        return error

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def report(error: BaseException, rank: int) -> dict[str, Any]:
    """What the other processes need to stop with `error`: its kind, exit code and message."""
    if isinstance(error, engine.Interrupted):
        return {"rank": rank, "signal": error.number, "message": str(error)}
    if isinstance(error, engine.EngineError):
        return {"rank": rank, "exit_code": error.exit_code, "message": str(error)}
    return {"rank": rank, "exit_code": 1, "message": f"rank {rank}: {engine.one_line(error)}"}


def from_report(record: dict[str, Any]) -> engine.EngineError:
    """The error another process reported, for this one to stop with quietly."""
    error: engine.EngineError
    if "signal" in record:
        error = engine.Interrupted(record["signal"])
        error.args = (record["message"],)
    elif record["exit_code"] == engine.ConfigError.exit_code:
        error = engine.ConfigError(record["message"])
    else:
        error = engine.TrainingError(record["message"], located=True)
    error.shown = False
    return error


def launch_if_asked(args: argparse.Namespace, run: Any) -> int:
    """``run --nproc N``: the same command in N processes of this machine, started by torch's
    launcher API (``torch.distributed.run``, what torchrun is); its exit code is the first failed
    process's, or the signal's that stopped the launcher (after its processes stopped cleanly).
    Without ``--nproc``, the run itself."""
    if args.nproc is None:
        return run(args)
    if args.nproc < 1:
        raise engine.ConfigError(f"--nproc: expected 1 or more processes, got {args.nproc}")
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
    command = ["--standalone", f"--nproc-per-node={args.nproc}", "--module", "engine", *without_nproc(args.argv)]
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
