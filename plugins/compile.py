"""``accelerate = "compile"``: ``torch.compile`` of the whole train step.

One compiled function covers before_forward, forward, every `compute_loss` term, zero-grad,
backward and the optimizer step; ``[compile] mode``, ``fullgraph`` and ``dynamic`` go to
``torch.compile`` as given (``mode = "default"`` is torch's default). Dynamo cannot trace
``Tensor.backward()``, so the step always splits there: AOTAutograd compiles the backward together
with the forward graph, and torch.optim adds its own two breaks around ``optimizer.step`` (so that
the update compiles as an in-place, no-grad graph). ``fullgraph = true`` is therefore a config
error at the first step, naming torch's reason; any other break is reported.

After the first compiled step one line reports the graphs, the graph breaks and their causes
(``[compile] explain = true`` prints every reason). A batch of another size than the configured
one (the last partial batch of an epoch) runs the eager step, so it never costs a recompile.
Before the scheduler binds to it, a torch.optim optimizer is rebuilt with its learning rate as a
tensor (a scheduler's new rate then needs no recompile) and, unless ``impl = "fused"`` was asked
for, as a per-parameter loop that Dynamo traces and Inductor fuses (the fused kernel is opaque to
it). With gradient accumulation the step reads its window from a constant the wrapper sets, so
each window position compiles once. Modes that replay CUDA graphs (``reduce-overhead``,
``max-autotune`` on CUDA) overwrite a step's outputs at the next replay: those outputs are copied.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.utils import counters

import engine

Step = Callable[[engine.Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graph breaks that come from torch itself, whatever the plugins: reason text -> label.
KNOWN = {
    "Tensor.backward()": "backward",
    "torch._dynamo.graph_break()": "torch.optim step boundary",
    "GradScaler": "GradScaler",
}


class Compile:
    """Per run: what the compiled step changed (restored at the end) and the compile count."""

    def __init__(self) -> None:
        self.graphs = -1  # graphs compiled once the first compiled step ran; -1 until then
        self.restore: list[Callable[[], None]] = []

    @engine.hookimpl
    def register_settings(self):
        return {"compile": {"mode": "default", "fullgraph": False, "dynamic": None, "explain": False}}

    @engine.hookimpl(tryfirst=True)  # before the scheduler is built on the optimizer it may replace
    def on_run_start(self, trainer: engine.Trainer) -> None:
        if trainer.config.get("accelerate") != "compile":
            return
        check(trainer.config["compile"])
        trainer.optimizer = traceable(trainer.optimizer, trainer.config["optimizer"].get("impl"))

    @engine.hookimpl
    def wrap_step(self, step: Step, trainer: engine.Trainer) -> Step | None:
        if trainer.config.get("accelerate") != "compile":
            return None
        return self.accelerate(step, trainer)

    @engine.hookimpl
    def on_run_end(self) -> None:
        while self.restore:
            self.restore.pop()()
        if self.graphs >= 0:
            more = counters["stats"]["unique_graphs"] - self.graphs
            if more:
                print(f"compile: {more} more graphs compiled after the first step (recompiles)", flush=True)

    def accelerate(self, step: Step, trainer: engine.Trainer) -> Step:
        """`step` compiled with the `[compile]` settings; batches of another size run `step` itself."""
        settings = trainer.config["compile"]
        check(settings)
        self.traceable_zero_grad(trainer.optimizer)
        self.traceable_step(trainer.optimizer)
        window = self.constant_window(trainer)
        mode = None if settings["mode"] == "default" else settings["mode"]
        compiled = torch.compile(step, mode=mode, fullgraph=settings["fullgraph"], dynamic=settings["dynamic"])
        if trainer.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune"):
            compiled = graph_outputs_kept(compiled)
        size = full_batch_size(trainer)

        def first(batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            breaks, graphs = Counter(counters["graph_break"]), counters["stats"]["unique_graphs"]
            try:
                result = compiled(batch)
            except torch._dynamo.exc.Unsupported as error:
                if not settings["fullgraph"]:
                    raise
                reason = str(error).strip().splitlines()[0]
                raise engine.ConfigError(
                    f"compile.fullgraph = true: torch.compile cannot trace the whole step as one graph ({reason}); "
                    "set it to false, and the graph breaks are reported"
                ) from error
            self.graphs = counters["stats"]["unique_graphs"]
            new = Counter(counters["graph_break"])
            new.subtract(breaks)
            print(summary(+new, counters["stats"]["unique_graphs"] - graphs), flush=True)
            if settings["explain"]:
                for reason, count in (+new).items():
                    print(f"  graph break x{count}: {' '.join(reason.split())}", flush=True)
            return result

        def compiled_step(batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if window is not None:
                window[0] = type(trainer).accumulation_window(trainer)
            if len(batch.y) != size:
                return step(batch)  # the last partial batch: eager, so no recompile each epoch
            if self.graphs < 0:
                return first(batch)
            return compiled(batch)

        return compiled_step

    def traceable_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Let dynamo trace zero_grad (torch marks ``Optimizer.zero_grad`` as not traceable)."""
        if "zero_grad" in vars(optimizer):
            return  # another plugin (cudagraph, under auto) already owns it
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def zero_grad(set_to_none: bool = True) -> None:
            for param in params:
                param.grad = None

        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        self.restore.append(lambda: vars(optimizer).pop("zero_grad", None))

    def traceable_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call the optimizer's own step, not the wrapper an LR scheduler puts on it.

        torch's LR schedulers wrap ``optimizer.step`` only to note that it was called (for a
        warning about call order); Dynamo skips their module, so that wrapper cost a graph break.
        This one, which Dynamo traces, sets the note once and keeps the mark the scheduler checks.
        """
        wrapper = vars(optimizer).get("step")
        if wrapper is None or not getattr(wrapper, "_wrapped_by_lr_sched", False):
            return
        optimizer._opt_called = True  # type: ignore[attr-defined]
        own_step = type(optimizer).step

        def step(*args: Any, **kwargs: Any) -> Any:
            return own_step(optimizer, *args, **kwargs)

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = step  # type: ignore[method-assign]
        self.restore.append(lambda: setattr(optimizer, "step", wrapper))

    def constant_window(self, trainer: engine.Trainer) -> list[tuple[bool, bool, float]] | None:
        """With gradient accumulation: the step reads its window from a list set before each call.

        The core computes the window from ``state.batch``, which changes every step; traced as is,
        every position would recompile. Read from here, the compiled step sees at most a few
        distinct windows (first, middle, last, the epoch's short last window).
        """
        if trainer.accumulation == 1:
            return None
        window = [trainer.accumulation_window()]
        trainer.accumulation_window = lambda: window[0]  # type: ignore[method-assign]
        self.restore.append(lambda: vars(trainer).pop("accumulation_window", None))
        return window


def traceable(optimizer: torch.optim.Optimizer, impl: str | None) -> torch.optim.Optimizer:
    """A torch.optim optimizer rebuilt so that Dynamo traces its step and a scheduler never recompiles it.

    The learning rate becomes a tensor: as a float it is a constant of the graph, so each new value a
    scheduler sets would recompile the step. The per-parameter loop replaces a fused kernel that
    "auto" chose (opaque to Dynamo) and foreach (which torch refuses with a tensor learning rate
    unless capturable); Inductor fuses the traced update itself. An explicit ``impl = "fused"`` stays.
    """
    if not type(optimizer).__module__.startswith("torch.optim"):
        return optimizer
    flags: dict[str, Any] = {} if impl == "fused" else {"fused": None, "foreach": False}
    device = optimizer.param_groups[0]["params"][0].device
    if device.type != "cpu" and "capturable" in inspect.signature(type(optimizer).__init__).parameters:
        # The optimizer state then stays on the device: no host sync in the eager steps (a short
        # last batch), and the step is safe for the CUDA graphs of mode "reduce-overhead".
        flags["capturable"] = True
    return engine.rebuild_optimizer(optimizer, tensor_lr=True, **flags)


def check(settings: engine.Section) -> None:
    if settings["mode"] not in MODES:
        raise engine.ConfigError(f"compile.mode: expected one of {', '.join(MODES)}, got {settings['mode']!r}")
    if settings["dynamic"] not in (None, True, False):
        raise engine.ConfigError(f"compile.dynamic: expected true, false or unset, got {settings['dynamic']!r}")


def graph_outputs_kept(compiled: Step) -> Step:
    """The compiled step for modes that replay CUDA graphs (Inductor's cudagraph trees).

    Each replay overwrites the previous one's outputs, and the metrics plugin keeps every step's
    losses until its next sync: so each step is marked as a new iteration and its outputs copied.
    """

    def step(batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.compiler.cudagraph_mark_step_begin()
        loss, terms = compiled(batch)
        copies = torch.stack([loss.float(), *(term.float() for term in terms.values())]).unbind()
        return copies[0], dict(zip(terms, copies[1:]))

    return step


def full_batch_size(trainer: engine.Trainer) -> int:
    data = trainer.config["data"]
    return data.get("batch_size") or trainer.info.n_train


def summary(breaks: Counter[str], graphs: int) -> str:
    """``compile: 3 graphs, 3 graph breaks (backward 1, torch.optim step boundary 2)``."""
    causes: Counter[str] = Counter()
    for reason, count in breaks.items():
        label = next((label for text, label in KNOWN.items() if text in reason), "other")
        causes[label] += count
    other = causes.pop("other", 0)
    detail = ", ".join(f"{label} {count}" for label, count in causes.items())
    if other:
        detail += f"{', ' if detail else ''}other {other}: set compile.explain = true to see them"
    total = sum(breaks.values())
    return f"compile: {graphs} graphs, {total} graph breaks" + (f" ({detail})" if detail else "")
