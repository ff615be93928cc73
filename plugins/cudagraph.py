"""``accelerate = "cudagraph"``: the whole train step captured in one CUDA graph, replayed per batch.

Following PyTorch's whole-network capture (docs: "CUDA Graphs", whole-network capture):

- The optimizer is rebuilt graph-safe before the scheduler binds to it: ``capturable=True`` (or
  the fused kernel, for optimizers without that flag) and the learning rate as a device tensor.
  A scheduler writes a tensor rate in place (``fill_``), so the replayed graph follows the
  schedule; any other hyperparameter a scheduler changes afterwards (OneCycle's momentum) would be
  frozen in the graph, so that is an error naming the setting.
- Each distinct step is captured once: the batch shapes and the gradient-accumulation position
  (first/last batch of a window, its loss scale) pick the graph, so the last partial batch of an
  epoch and each accumulation position get their own graph, all in one memory pool.
- Before a graph is captured, its first ``[cudagraph] warmup`` steps run eagerly on a side stream,
  as the docs require (lazy initialisation, optimizer state); they are real training steps.
- Inputs are copied into static buffers (device to device for in-memory data, which lives on the
  GPU) and the graph is replayed: one replay per batch, no host-device sync.

Where this differs from the docs' single graph: gradients are zeroed in place instead of set to
None. The graphs of one accumulation window, and eager warm-up steps between replays, must all
accumulate into the same gradient tensors; gradients that backward allocated inside one graph's
capture would be invisible to the others.

What the wrapper changes: the graph's loss tensors are overwritten by the next replay, so each
step returns a copy (one small device-to-device copy of the loss and its terms); a NaN therefore
stays in the step that produced it and the metrics plugin reports it at its next sync.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

import engine

Step = Callable[[engine.Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class CudaGraph:
    """Per run: the original ``zero_grad`` to restore at the end."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    @engine.hookimpl
    def register_settings(self):
        return {"cudagraph": {"warmup": 3}}

    @engine.hookimpl(tryfirst=True)  # before the scheduler is built on the optimizer this replaces
    def on_run_start(self, trainer: engine.Trainer) -> None:
        if trainer.config.get("accelerate") == "cudagraph":
            self.prepare(trainer)

    @engine.hookimpl
    def wrap_step(self, step: Step, trainer: engine.Trainer) -> Step | None:
        if trainer.config.get("accelerate") != "cudagraph":
            return None
        return self.accelerate(step, trainer)

    @engine.hookimpl
    def on_run_end(self) -> None:
        if self.optimizer is not None and "zero_grad" in vars(self.optimizer):
            del self.optimizer.zero_grad  # back to the class's method

    def prepare(self, trainer: engine.Trainer) -> None:
        """Check the device and settings, and rebuild the optimizer graph-safe (capturable, tensor lr)."""
        if trainer.device.type != "cuda":
            raise engine.ConfigError(
                f"accelerate = 'cudagraph' needs a CUDA device; this run's device is {trainer.device.type}"
            )
        if trainer.config["cudagraph"]["warmup"] < 1:
            raise engine.ConfigError("cudagraph.warmup: must be at least 1 (eager steps before each capture)")
        trainer.optimizer = graph_safe(trainer.optimizer)
        if trainer.config.get("precision") == "16-mixed" and not trainer.optimizer.defaults.get("fused"):
            raise engine.ConfigError(
                "precision '16-mixed' with accelerate = 'cudagraph' needs a fused optimizer "
                "(optimizer.impl = 'fused' or 'auto'): GradScaler reads other optimizers' overflow flag on the host"
            )

    def accelerate(self, step: Step, trainer: engine.Trainer) -> Step:
        """`step` as graphs captured on first use and replayed after (see the module docstring)."""
        optimizer = self.optimizer = trainer.optimizer
        zero_grad = optimizer.zero_grad

        def zero_in_place(set_to_none: bool = True) -> None:
            zero_grad(set_to_none=False)  # every graph shares one set of gradient tensors

        optimizer.zero_grad = zero_in_place  # type: ignore[method-assign]
        return Graphs(step, trainer, trainer.config["cudagraph"]["warmup"])


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
            f"accelerate = 'cudagraph': optimizer {type(optimizer).__name__} has neither capturable nor fused"
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
                    f"accelerate = 'cudagraph': optimizer setting {key!r} of param group {index} changed from "
                    f"{old!r} to {new!r} after capture (a scheduler?); a CUDA graph keeps only tensor settings"
                )


class Captured:
    """One captured step: its graph, static input buffers and static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static: engine.Batch, packed: torch.Tensor, names: dict[str, int]):
        self.graph, self.static, self.packed, self.names = graph, static, packed, names

    def replay(self, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.static.x.copy_(batch.x, non_blocking=True)
        self.static.y.copy_(batch.y, non_blocking=True)
        self.graph.replay()
        # The next replay overwrites `packed`; the metrics plugin keeps each step's losses until it syncs.
        values = self.packed.clone().unbind()
        return values[0], {name: values[index] for name, index in self.names.items()}


class Graphs:
    """The step that warms up, captures and replays one graph per distinct step."""

    def __init__(self, step: Step, trainer: engine.Trainer, warmup: int) -> None:
        self.step, self.trainer, self.warmup = step, trainer, warmup
        self.graphs: dict[Hashable, Captured] = {}
        self.seen: Counter[Hashable] = Counter()
        self.pool: Any = None  # the memory pool every graph of the run shares
        self.stream = torch.cuda.Stream(trainer.device)
        self.frozen: Frozen | None = None

    def __call__(self, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = (batch.x.shape, batch.x.dtype, batch.y.shape, batch.y.dtype, self.trainer.accumulation_window())
        captured = self.graphs.get(key)
        if captured is None:
            if self.seen[key] < self.warmup:
                self.seen[key] += 1
                return self.eager(batch)
            if self.frozen is not None:
                self.frozen.check()  # a new graph must bake in what the others did
            captured = self.graphs[key] = self.capture(batch)
        else:
            self.frozen.check()
        return captured.replay(batch)  # capturing does not run the step: this replay does

    def eager(self, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A warm-up step on the side stream, as the docs prescribe before capture."""
        current = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = self.step(batch)
        current.wait_stream(self.stream)
        return result

    def capture(self, batch: engine.Batch) -> Captured:
        device = self.trainer.device
        static = engine.Batch(
            torch.empty_like(batch.x, device=device).copy_(batch.x),
            torch.empty_like(batch.y, device=device).copy_(batch.y),
        )
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss, terms = self.step(static)
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
