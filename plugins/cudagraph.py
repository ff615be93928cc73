"""``[accelerate] name = "cudagraph"``: the whole train step captured in CUDA graphs, replayed per batch.

Following PyTorch's whole-network capture (docs: "CUDA Graphs", whole-network capture):

- The optimizer (the last link of the optimizer chain, so before the scheduler binds to it) is
  made graph-safe: ``capturable=True`` (or the fused kernel, for optimizers without that flag) and
  the learning rate as a device tensor. A scheduler writes a tensor rate in place (``fill_``), so
  the replayed graph follows the schedule; any other hyperparameter a scheduler changes afterwards
  (OneCycle's momentum) would be frozen in the graph, so that is an error naming the setting.
- Each distinct step is captured once: the step is a function of the batch and its accumulation
  window, so the batch shapes and the window pick the graph; the last partial batch of an epoch
  and each accumulation position get their own graph, all in one memory pool.
- Before a graph is captured, its first ``warmup`` steps run eagerly on a side stream, as the
  docs require (lazy initialisation, optimizer state); they are real training steps.
- Inputs are copied into static buffers (device to device for in-memory data, which lives on the
  GPU) and the graph is replayed: one replay per batch, no host-device sync.

Where this differs from the docs' single graph: once the gradients exist (after the first eager
step), this wrapper zeroes them in place at a window's first batch and hands the inner step its
window with ``first = False``, so the step never sets them to None. The graphs of one
accumulation window, and eager warm-up steps between replays, must all accumulate into the same
gradient tensors; gradients that backward allocated inside one graph's capture would be invisible
to the others.

What the wrapper changes: the graph's loss tensors are overwritten by the next replay, so each
step returns a copy (one small device-to-device copy of the loss and its terms); a NaN therefore
stays in the step that produced it and the core reports it at its next logging point.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Hashable
from typing import Annotated, Any

import torch

import engine

Output = tuple[torch.Tensor, dict[str, torch.Tensor]]


def cudagraph(trainer: engine.TrainerView, warmup: Annotated[int, engine.Range(ge=1)] = 3) -> Graphed:
    """The train step as CUDA graphs (see the module docstring); `warmup` eager steps before each capture."""
    return Graphed(trainer, warmup)


@engine.hookimpl
def register_components():
    return {"accelerate": {"cudagraph": cudagraph}}


class Graphed:
    """The cudagraph acceleration: a graph-safe optimizer and the captured step."""

    build_seconds = 0.0  # a capture per distinct step, in milliseconds

    def __init__(self, trainer: engine.TrainerView, warmup: int) -> None:
        self.trainer, self.warmup = trainer, warmup

    def unavailable(self) -> str | None:
        if self.trainer.device.type != "cuda":
            return f"it needs a CUDA device; this run's device is {self.trainer.device.type}"
        if self.trainer.distributed.sharded:
            return (
                "FSDP2's all-gathers and reduce-scatters (distributed.strategy 'fsdp') are not captured; use "
                "'compile' or 'eager'"
            )
        if self.trainer.world_size > 1:
            return (
                f"it runs in a single process, not {self.trainer.world_size}: DDP's gradient all-reduce is "
                "not captured; use 'compile' or 'eager'"
            )
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        safe = graph_safe(optimizer)
        if self.trainer.precision.scaler is not None and not safe.defaults.get("fused"):
            raise engine.ConfigError(
                "accelerate.name = 'cudagraph' with a gradient scaler (precision '16-mixed') needs a fused "
                "optimizer (optimizer.impl = 'fused' or 'auto'): GradScaler reads other optimizers' overflow "
                "flag on the host"
            )
        return safe

    def step(self, step: engine.Step) -> engine.Step:
        return Graphs(step, self.trainer, self.warmup)


def graph_safe(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A new optimizer of the same class and settings that a CUDA graph can capture."""
    accepts = inspect.signature(type(optimizer).__init__).parameters
    flags: dict[str, Any] = {}
    if "capturable" in accepts:
        flags["capturable"] = True
    elif "fused" in accepts:
        flags.update(fused=True, foreach=False)  # SGD: only its fused kernel reads a tensor learning rate
    else:
        raise engine.ConfigError(
            f"accelerate.name = 'cudagraph': optimizer {type(optimizer).__name__} has neither capturable nor fused"
        )
    return engine.rebuild_optimizer(optimizer, tensor_lr=True, **flags)


class Frozen:
    """The optimizer settings a captured step bakes in: every non-tensor value of every param group."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.watched = [
            (index, group, key)
            for index, group in enumerate(optimizer.param_groups)
            for key, value in group.items()
            if key != "params" and not isinstance(value, torch.Tensor)
        ]
        self.values = self.now()

    def now(self) -> list[Any]:
        return [group[key] for _, group, key in self.watched]

    def check(self) -> None:
        """A TrainingError when a setting changed since capture: the graphs would still use the old one."""
        if self.now() == self.values:
            return
        for (index, _, key), old, new in zip(self.watched, self.values, self.now()):
            if old != new:
                raise engine.TrainingError(
                    f"accelerate.name = 'cudagraph': optimizer setting {key!r} of param group {index} changed "
                    f"from {old!r} to {new!r} after capture (a scheduler?); a CUDA graph keeps only tensor settings"
                )


class Captured:
    """One captured step: its graph, static input buffers and static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static: engine.Batch, packed: torch.Tensor, names: dict[str, int]):
        self.graph, self.static, self.packed, self.names = graph, static, packed, names

    def replay(self, batch: engine.Batch) -> Output:
        self.static.x.copy_(batch.x, non_blocking=True)
        self.static.y.copy_(batch.y, non_blocking=True)
        self.graph.replay()
        # The next replay overwrites `packed`; the core keeps each step's losses until it logs them.
        values = self.packed.clone().unbind()
        return values[0], {name: values[index] for name, index in self.names.items()}


class Graphs:
    """The step that warms up, captures and replays one graph per distinct (shapes, window)."""

    def __init__(self, step: engine.Step, trainer: engine.TrainerView, warmup: int) -> None:
        self.step, self.trainer, self.warmup = step, trainer, warmup
        self.params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        self.grads: list[torch.Tensor] = []  # the gradient tensors every graph accumulates into
        self.graphs: dict[Hashable, Captured] = {}
        self.seen: Counter[Hashable] = Counter()
        self.pool: Any = None  # the memory pool every graph of the run shares
        self.stream = torch.cuda.Stream(trainer.device)
        self.frozen: Frozen | None = None

    def __call__(self, batch: engine.Batch, window: engine.Window) -> Output:
        key = (batch.x.shape, batch.x.dtype, batch.y.shape, batch.y.dtype, window)
        captured = self.graphs.get(key)
        if captured is None:
            if self.seen[key] < self.warmup:
                self.seen[key] += 1
                return self.eager(batch, window)
            if self.frozen is not None:
                self.frozen.check()  # a new graph must bake in what the others did
            captured = self.graphs[key] = self.capture(batch, window)
        else:
            self.frozen.check()
        return captured.replay(batch)  # capturing does not run the step: this replay does

    def inner(self, batch: engine.Batch, window: engine.Window) -> Output:
        """The step, with gradients zeroed in place once they exist (see the module docstring)."""
        if not self.grads:
            result = self.step(batch, window)
            self.grads = [p.grad for p in self.params if p.grad is not None]
            return result
        if window.first:
            for grad in self.grads:
                grad.zero_()
        return self.step(batch, window._replace(first=False))

    def eager(self, batch: engine.Batch, window: engine.Window) -> Output:
        """A warm-up step on the side stream, as the docs prescribe before capture."""
        current = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = self.inner(batch, window)
        current.wait_stream(self.stream)
        return result

    def capture(self, batch: engine.Batch, window: engine.Window) -> Captured:
        device = self.trainer.device
        static = engine.Batch(
            torch.empty_like(batch.x, device=device).copy_(batch.x),
            torch.empty_like(batch.y, device=device).copy_(batch.y),
        )
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss, terms = self.inner(static, window)
            outputs, names = [loss], {}
            for name, term in terms.items():
                if term is not loss:
                    outputs.append(term)
                names[name] = next(i for i, output in enumerate(outputs) if output is term)
            packed = torch.stack([output.float() for output in outputs])
        self.pool = graph.pool()
        if self.frozen is None:
            self.frozen = Frozen(self.trainer.optimizer)
        return Captured(graph, static, packed, names)
