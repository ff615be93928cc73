"""``[distributed]``: training over the processes a launcher started, data-parallel (DDP) or with
the model sharded (FSDP2).

``torchrun --standalone --nproc-per-node N -m engine run job.toml``, or ``python -m engine run
job.toml --nproc N`` (the same, started through torch's launcher API), runs the whole job in N
processes; ``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` on each of M
machines runs it across them, and ``--max-restarts K`` restarts every process after a failure
(with ``resume = "auto"`` the run continues from its last checkpoint). The ``ddp`` component,
first in the setup chain, joins the processes: it initialises torch.distributed's default process
group from the launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) with ``backend`` gloo on the CPU and NCCL on CUDA (``auto``), each process on
the GPU of its local rank. Then, by ``strategy``:

- ``ddp`` (the default): `wrap_model` wraps the model in ``DistributedDataParallel``, last in the
  chain: during backward DDP replaces every process's gradients with their mean, and `wrap_step`
  runs each batch of an accumulation window but the last under ``no_sync()`` (one all-reduce per
  optimizer step). ``trainer.module`` stays the bare model, which is what is saved and exported.
  Without a launcher, or with one process, the component is None: the run is a single process.
- ``fsdp``: every process holds a shard of the parameters, gradients and optimizer state
  (plugins/distributed/sharded.py); ``shard_modules`` and ``reshard_after_forward`` say how.
  Checkpoints are written by every process, each its shards (plugins/checkpoint.py), and resume
  with any number of processes; model.pt holds the whole model, gathered at the end. Without a
  launcher the run is one process sharding over itself (a group of one), so that it resumes a
  sharded checkpoint and writes one.

The core does the rest through the component (`engine.Distributed`): each process's loaders take
its slice of every batch (the global one), the logged losses and the validation sums are reduced
once per logging point and validation, and rank 0 alone prints and writes. After the first
optimizer step, rank 0 prints what each process holds: its parameters', gradients' and optimizer
state's bytes, and their share of the whole model's. ``run --nproc N`` (`register_commands`)
starts the processes with torch's launcher API (plugins/distributed/launch.py).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import engine

from . import launch, memory
from .processes import Joined
from .sharded import Sharded


class DataParallel:
    """Per run: the processes this plugin joined, the DDP module it made, and whether it has
    reported what each process holds."""

    def __init__(self) -> None:
        self.joined: Joined | None = None
        self.strategy = "ddp"
        self.ddp: DistributedDataParallel | None = None
        self.reported = False

    @engine.hookimpl
    def register_components(self):
        return {"distributed": {"ddp": self.join}, "default": {"distributed": "ddp"}}

    @engine.hookimpl
    def register_commands(self, commands: engine.Commands) -> None:
        launch.add_options(commands)

    def join(
        self,
        device: torch.device,
        backend: Literal["auto", "gloo", "nccl"] = "auto",
        strategy: Literal["ddp", "fsdp"] = "ddp",
        shard_modules: tuple[str, ...] = (),  # fsdp: the class names of the units; (): the model's layers
        reshard_after_forward: bool = True,  # fsdp: free a unit's gathered parameters after its forward
    ) -> Joined | None:
        """Join the processes of the launcher's run (see the module docstring); None for a single
        process under ``ddp``."""
        if strategy == "ddp" and (shard_modules or not reshard_after_forward):
            key = "shard_modules" if shard_modules else "reshard_after_forward"
            raise engine.ConfigError(f"distributed.{key}: a setting of strategy 'fsdp'; this run's is 'ddp'")
        if strategy == "ddp" and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if dist.is_initialized():
            raise engine.ConfigError(
                "distributed: torch.distributed's process group exists already; the ddp component makes its own"
            )
        self.strategy = strategy
        if strategy == "fsdp":
            self.joined = Sharded(device, backend, shard_modules, reshard_after_forward)
        else:
            self.joined = Joined(device, backend)
        return self.joined

    @engine.hookimpl(trylast=True)  # last, so outermost: DDP averages what the wrappers inside it compute
    def wrap_model(self, model: torch.nn.Module, trainer: engine.TrainerView) -> torch.nn.Module | None:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) and not trainer.config["run_name"]:
            raise engine.ConfigError(
                "torchrun --max-restarts: name the run (run_name) and set resume = 'auto', so that restarted "
                "processes continue it from its last checkpoint"
            )
        if self.joined is None or self.joined.sharded:
            return None  # FSDP2's units reduce the gradients themselves
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

    @engine.hookimpl
    def skip_per_step(self) -> bool:
        return self.joined is None

    @engine.hookimpl
    def after_step(self, window: engine.Window, trainer: engine.TrainerView) -> None:
        if self.reported or not window.last:
            return
        self.reported = True  # once, when the gradients and the optimizer's state exist
        rows, whole = memory.figures(trainer)  # every process: one collective
        if trainer.rank == 0:
            print(memory.report(rows, whole, self.strategy), flush=True)
