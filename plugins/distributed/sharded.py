"""``[distributed] strategy = "fsdp"``: the model sharded over the processes with FSDP2.

`Sharded.distribute` applies ``torch.distributed.fsdp.fully_shard`` to each unit of the model,
then to the model itself: each process keeps its shard of every parameter (a DTensor, split
along its first dimension), the optimizer is built on the shards and keeps its state for them
alone, and the gradients are reduce-scattered into shards after backward. A unit's whole
parameters exist only while it runs: all-gathered before its forward, freed after it (unless
``reshard_after_forward = false``: then they stay until its backward), all-gathered again for
backward. The units are the submodules whose class names ``shard_modules`` lists, or by default
the model's layers: every child holding parameters, looking inside containers (``Sequential``,
``ModuleList``, ``ModuleDict``) and through a module with one such child (the model behind its
input transform). The model is built whole on the CPU of every process (the same seeded
initialisation as one process's), and `fully_shard` moves each process's shards to its device.

``[precision] bf16-mixed`` (or ``16-mixed``) becomes FSDP2's ``MixedPrecisionPolicy``: the
parameters are all-gathered and computed with in bf16 and the gradients reduced in float32 (the
shards and the optimizer stay float32), beside the core's autocast; a gradient scaler's inf
check is reduced over the processes by DTensor.

Checkpoints: `state` is torch.distributed.checkpoint's ``get_state_dict``, this process's shards
keyed by parameter names, which the checkpoint plugin writes with ``dcp.save`` from every process
and reads back into the shards of any number of processes; `full_weights` gathers the whole state
dict onto rank 0's CPU, one tensor at a time, for model.pt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import engine

from .processes import Joined

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
STOP_KEY = "stop"  # in the store: the step every process of an interrupted run stops at
# How long a process that stopped waits for the others to stop at the same step: every process
# is asked at once (torchrun and schedulers signal them all), and none is more than a step away.
STOP_WAIT = timedelta(seconds=60)


class Sharded(Joined):
    """The run's processes, each holding its shard of the model (FSDP2)."""

    sharded = True

    def __init__(
        self, device: torch.device, backend: str, shard_modules: Sequence[str], reshard_after_forward: bool
    ) -> None:
        super().__init__(device, backend)
        self.shard_modules, self.reshard_after_forward = tuple(shard_modules), reshard_after_forward
        self.stop_step: int | None = None

    def distribute(self, module: nn.Module, precision: engine.Precision) -> nn.Module:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy()
        if precision.dtype is not None:
            policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward, "mp_policy": policy}
        for unit in units(module, self.shard_modules):
            fully_shard(unit, **options)
        fully_shard(module, **options)
        # A unit allocates its whole parameters at its first all-gather: here, not under the
        # torch.inference_mode of the sample check and validation, where they would be inference
        # tensors that training cannot update in place.
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.unshard()
                sub.reshard()
        return module

    def state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        model, optimizer_state = get_state_dict(module, optimizer)
        return {"model": model, "optimizer": optimizer_state}

    def load_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
        # A sharded run's optimizer state names its parameters; a whole model's numbers them.
        if not all(isinstance(name, str) for group in saved["optimizer"]["param_groups"] for name in group["params"]):
            raise ValueError(
                "it holds the whole model of a run whose model was not sharded (distributed.strategy 'ddp', or "
                "one process): continue it with that strategy"
            )
        set_state_dict(module, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])

    def full_weights(self, module: nn.Module) -> dict[str, Any]:
        # cpu_offload: rank 0 receives each whole tensor on its CPU in turn; the others get {}.
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def stops(self, step: int) -> bool:
        """The first process asked to stop names the step (the end of the window after this one,
        which no process can have passed: each step's collectives hold them within one step of
        each other); each stops there, once all have reached it, so that they take the last
        checkpoint together."""
        if self.stop_step is None:
            self.stop_step = int(self.store.compare_set(STOP_KEY, "", str(step + 1)).decode())
        if step < self.stop_step:
            return False
        arrived, everyone = f"{STOP_KEY}/{step}", f"{STOP_KEY}/{step}/all"
        if self.store.add(arrived, 1) == self.world_size:
            self.store.set(everyone, "1")
        try:
            self.store.wait([everyone], STOP_WAIT)
        except Exception:
            raise engine.TrainingError(
                f"asked to stop at step {step}, but not every process stopped there within "
                f"{STOP_WAIT.seconds} s (was each one signalled?): no last checkpoint",
                located=True,
            ) from None
        return True


def units(module: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The submodules `fully_shard` makes units of, children before their parents: those whose
    class is named in `names`, else the model's layers (see the module docstring)."""
    if not names:
        return layers(module)
    found = [sub for sub in module.modules() if sub is not module and type(sub).__name__ in names]
    missing = sorted(set(names) - {type(sub).__name__ for sub in found})
    if missing:
        classes = ", ".join(sorted({type(sub).__name__ for sub in module.modules()}))
        raise engine.ConfigError(
            f"distributed.shard_modules: the model has no submodule of class {', '.join(map(repr, missing))} "
            f"(its classes: {classes})"
        )
    return found[::-1]  # modules() lists parents first


def layers(module: nn.Module) -> list[nn.Module]:
    """The children holding parameters, containers opened, through a module with one such child."""
    holding = [child for child in module.children() if any(True for _ in child.parameters())]
    if len(holding) == 1:
        return layers(holding[0])
    found: list[nn.Module] = []
    for child in holding:
        found += layers(child) if isinstance(child, CONTAINERS) else [child]
    return found
