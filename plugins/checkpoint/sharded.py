"""Sharded checkpoints: what a run whose model is sharded (``distributed.sharded``: FSDP2) writes.

``checkpoints/step-<step>.dcp/`` holds the model's and optimizer's shards as torch.distributed.
checkpoint wrote them, every process its own (``__<rank>_0.distcp``, and ``.metadata``: which
piece of which tensor is where), and beside them ``state.pt``, which rank 0 writes: the rest of
the checkpoint (the loop state with every RNG, the scheduler, the gradient scaler, each plugin's
state), as in a checkpoint file. Nothing is gathered: each process writes what it holds.

The directory is written under a temporary name (``.step-<step>.dcp.tmp``, the same on every
process: with several machines it must be on a filesystem they share) and renamed by rank 0 once
every process's shards and ``.metadata`` are on disk (`dcp.save` returns on rank 0 after it
wrote the metadata, which it does once every process has written) and ``state.pt`` is beside
them. With ``async_save`` (the default) `dcp.async_save` copies the shards to memory on the
training thread and writes them from a thread of its own, its collectives on a gloo group of
their own so that they never interleave with training's.

Read back, the shards are loaded into the tensors of the resuming run (`read`), whatever number
of processes it has: DCP reshards. In a single process without a group (`engine.load`, the
after-training commands), the whole tensors are read.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

import engine

STATE = "state.pt"  # in a sharded checkpoint's directory: the checkpoint but the shards
SHARDS = ("model", "optimizer")  # the keys of a checkpoint (Trainer.checkpoint) DCP writes


def start(taken: dict[str, Any], temporary: Path, group: Any, in_background: bool) -> Future[Any]:
    """Write this process's shards of the checkpoint `taken` (which keeps the rest) into the
    directory `temporary`: every process calls it. Done when the future is."""
    shards = {key: taken.pop(key) for key in SHARDS}
    if in_background:
        return dcp.async_save(shards, checkpoint_id=temporary, process_group=group)
    written: Future[Any] = Future()
    written.set_result(dcp.save(shards, checkpoint_id=temporary, process_group=group))
    return written


def read(path: Path, template: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint directory `path`, its shards read into `template`'s tensors."""
    shards = {key: template[key] for key in SHARDS if key in template}
    # A sharded run's optimizer state names its parameters; a whole model's numbers them.
    groups = shards.get("optimizer", {}).get("param_groups", [])
    if any(not isinstance(name, str) for group in groups for name in group["params"]):
        raise engine.ConfigError(
            f"checkpoint '{path}' holds a sharded model (distributed.strategy 'fsdp'): continue it with that strategy"
        )
    beside = engine.runs.load(path / STATE, engine.runs.CHECKPOINT_FORMAT)
    whole = not any(isinstance(value, DTensor) for value in shards.get("model", {}).values())
    if not shards:  # what the checkpoint records besides its tensors (a resume checks it first)
        return beside
    try:
        with warnings.catch_warnings():  # that a single process reads the whole tensors, as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(shards, checkpoint_id=path, no_dist=whole or not dist.is_initialized())
    except Exception as error:
        raise engine.ConfigError(f"checkpoint '{path}' does not fit this run: {engine.one_line(error)}") from None
    return {**beside, **shards}
