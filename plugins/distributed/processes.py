"""The process group of a run (`Joined`, an `engine.Distributed`), and how a failure or a signal on
one process reaches the others.

A process that fails or is interrupted reports it in the key-value store the processes met in
(torch.distributed's rendezvous; torchrun's own): the first report is the run's error, which the
process that made it prints. The others stop when a collective fails because that process left
it, and take its error (without printing it), so rank 0 writes the failing process's message in
the run's summary and every process exits with its code. `close` leaves the group: a process
that exits without it is aborted by torch's gloo backend ("terminate called without an active
exception").
"""

from __future__ import annotations

import atexit
import gc
import json
import os
from typing import Any

import torch
import torch.distributed as dist

import engine

ERROR_KEY = "error"  # in the store: the first error of the run, as JSON
COLLECTED_AT_EXIT: list[object] = []  # gc.collect, once registered with atexit


class Joined(engine.OneProcess):
    """The run's processes, each holding the whole model (DDP): a single process's `distribute`,
    `state`, `load_state` and `full_weights`, with torch.distributed's collectives. Without a
    launcher (one process asking for a group: FSDP2 needs one) the group is this process alone."""

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
        if "WORLD_SIZE" in os.environ:
            store, rank, world_size = next(dist.rendezvous("env://"))
        else:
            store, rank, world_size = dist.HashStore(), 0, 1
        # torchrun's agent keeps its store across the restarts of --max-restarts, and a process
        # group looks its peers' addresses up there: every key of an attempt (the groups' and the
        # run's error) goes under a prefix of its own, or a process that reaches a group first
        # reads the address of a process of the attempt before. A store that rank 0 hosts outlives
        # a run within its process: forget an earlier run's error.
        store = dist.PrefixStore(f"engine/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        self.store = store
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
        if gc.collect not in COLLECTED_AT_EXIT:  # once a process, however many runs it starts
            atexit.register(gc.collect)
            COLLECTED_AT_EXIT.append(gc.collect)

    def broadcast(self, value: Any) -> Any:
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def stops(self, step: int) -> bool:
        # Rank 0 stops; the others stop at their next collective, which it no longer joins.
        return self.rank == 0

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
