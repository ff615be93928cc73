"""``[accelerate] name = "compile"``: ``torch.compile`` of the whole train step.

One compiled function covers before_forward, forward, every `compute_loss` term, zero-grad,
backward and the optimizer step; ``mode``, ``fullgraph`` and ``dynamic`` go to ``torch.compile``
as given (``mode = "default"`` is torch's default). Dynamo cannot trace ``Tensor.backward()``, so
the step always splits there: AOTAutograd compiles the backward together with the forward graph,
and torch.optim adds its own two breaks around ``optimizer.step`` (so that the update compiles as
an in-place, no-grad graph). ``fullgraph = true`` is therefore a config error at the first step,
naming torch's reason; any other break is reported.

After the first compiled step one line reports the graphs, the graph breaks and their causes
(``explain = true`` prints every reason). The step is a function of the batch and its
accumulation window, and ``dynamic = false`` (the default here) compiles each batch shape and
window position once, as its own static graph: the last partial batch of an epoch costs one more
compile per run, and which graph runs a step depends on the data only, never on where a process
started, so a resumed run repeats the uninterrupted one bit for bit. (With ``dynamic`` unset,
torch recompiles for symbolic shapes after the second size it sees.)

The optimizer (the last link of the optimizer chain) gets its learning rate as a tensor, so a
scheduler's new rate needs no recompile. It keeps its implementation: a fused kernel is opaque to
Dynamo (two more graph breaks, reported as such) but measured faster here than Inductor's code
for the traced loop on the MLP job (490 vs 539 us a step; on the tutorial job 169 vs 140);
``[optimizer] impl = "for_loop"`` gives the breakless step. On the CPU a foreach implementation
becomes the loop (torch refuses a tensor rate with foreach unless capturable); on CUDA the
optimizer is made capturable instead. Modes that replay CUDA graphs (``reduce-overhead``,
``max-autotune`` on CUDA) overwrite a step's outputs at the next replay: those outputs are copied.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Annotated, Any, Literal

import torch

import engine

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# Graph breaks that come from torch itself, whatever the plugins: reason text -> label.
KNOWN = {
    "Tensor.backward()": "backward",
    "torch._dynamo.graph_break()": "torch.optim step boundary",
    "GradScaler": "GradScaler",
    "fused optimizer": "fused optimizer",
    # DistributedDataParallel's forward, with several processes: its logger and bookkeeping.
    "DistributedDataParallel": "DDP",
    "set_runtime_stats_and_log": "DDP",
    "_rebuild_buckets": "DDP",
    # FSDP2's hooks, under distributed.strategy = "fsdp": Dynamo leaves them to eager
    # (torch._dynamo.config.skip_fsdp_hooks), wrapping them in torch._dynamo.disable as it traces.
    "function `disable` in file": "FSDP2 hooks",
}


class Compile:
    """Per run: the compiled step it built, whose recompiles are reported at the end."""

    def __init__(self) -> None:
        self.built: list[Compiled] = []

    @engine.hookimpl
    def register_components(self):
        return {"accelerate": {"compile": self.compiled}}

    def compiled(
        self,
        trainer: engine.TrainerView,
        mode: Mode = "default",
        fullgraph: bool = False,
        dynamic: bool | None = False,
        explain: Annotated[bool, engine.Changeable()] = False,  # reports only: a resumed run may change it
    ) -> Compiled:
        """The train step under torch.compile (see the module docstring)."""
        built = Compiled(trainer.device, mode, fullgraph, dynamic, explain, says=trainer.rank == 0)
        self.built.append(built)
        return built

    @engine.hookimpl
    def on_run_end(self) -> None:
        for built in self.built:
            if built.graphs >= 0 and built.says:
                more = dynamo_counters()["stats"]["unique_graphs"] - built.graphs
                if more:
                    print(f"compile: {more} more graphs compiled after the first step (recompiles)", flush=True)


class Compiled:
    """The compile acceleration: a traceable optimizer and the compiled step."""

    # What the first compiled steps cost, about: 3 to 5 s for the MLP job's step on this project's
    # CPU (bench/RESULTS.md, compiled); auto tries it only on a run long enough to pay it back.
    build_seconds = 3.0

    def __init__(
        self, device: torch.device, mode: str, fullgraph: bool, dynamic: bool | None, explain: bool, says: bool = True
    ) -> None:
        self.device, self.mode, self.fullgraph, self.dynamic, self.explain = device, mode, fullgraph, dynamic, explain
        self.says = says  # prints its report: of a run's processes, rank 0 alone
        self.graphs = -1  # graphs compiled once the first compiled step ran; -1 until then

    def unavailable(self) -> str | None:
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if not type(optimizer).__module__.startswith("torch.optim"):
            return optimizer
        accepts = inspect.signature(type(optimizer).__init__).parameters
        flags: dict[str, Any] = {}
        if self.device.type != "cpu" and "capturable" in accepts:
            # The state then stays on the device: no host sync in the eager steps (a short last
            # batch), and the step is safe for the CUDA graphs of mode "reduce-overhead".
            flags["capturable"] = True
        elif optimizer.defaults.get("foreach"):
            flags["foreach"] = False
        return engine.rebuild_optimizer(optimizer, tensor_lr=True, **flags)

    def step(self, step: engine.Step) -> engine.Step:
        mode = None if self.mode == "default" else self.mode
        compiled = torch.compile(step, mode=mode, fullgraph=self.fullgraph, dynamic=self.dynamic)
        if self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune"):
            compiled = graph_outputs_kept(compiled)

        def first(batch: engine.Batch, window: engine.Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            counters = dynamo_counters()
            breaks, graphs = Counter(counters["graph_break"]), counters["stats"]["unique_graphs"]
            try:
                result = compiled(batch, window)
            except torch._dynamo.exc.Unsupported as error:
                if not self.fullgraph:
                    raise
                reason = str(error).strip().splitlines()[0]
                raise engine.ConfigError(
                    f"accelerate.fullgraph = true: torch.compile cannot trace the whole step as one graph "
                    f"({reason}); set it to false, and the graph breaks are reported"
                ) from error
            self.graphs = counters["stats"]["unique_graphs"]
            new = Counter(counters["graph_break"])
            new.subtract(breaks)
            if self.says:
                print(summary(+new, counters["stats"]["unique_graphs"] - graphs), flush=True)
            if self.explain and self.says:
                for reason, count in (+new).items():
                    print(f"  graph break x{count}: {' '.join(reason.split())}", flush=True)
            return result

        def compiled_step(batch: engine.Batch, window: engine.Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if self.graphs < 0:
                return first(batch, window)
            return compiled(batch, window)

        return compiled_step


def dynamo_counters() -> Any:
    """Dynamo's graph and graph-break counters, imported only when a run compiles (the import
    costs 0.9 s, half the start-up of a run that does not)."""
    from torch._dynamo.utils import counters

    return counters


def graph_outputs_kept(compiled: engine.Step) -> engine.Step:
    """The compiled step for modes that replay CUDA graphs (Inductor's cudagraph trees).

    Each replay overwrites the previous one's outputs, and the core keeps every step's losses
    until its next logging point: so each step is marked as a new iteration and its outputs copied.
    """

    def step(batch: engine.Batch, window: engine.Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.compiler.cudagraph_mark_step_begin()
        loss, terms = compiled(batch, window)
        copies = torch.stack([loss.float(), *(term.float() for term in terms.values())]).unbind()
        return copies[0], dict(zip(terms, copies[1:]))

    return step


def summary(breaks: Counter[str], graphs: int) -> str:
    """``compile: 3 graphs, 3 graph breaks (backward 1, torch.optim step boundary 2)``."""
    causes: Counter[str] = Counter()
    for reason, count in breaks.items():
        label = next((label for text, label in KNOWN.items() if text in reason), "other")
        causes[label] += count
    other = causes.pop("other", 0)
    detail = ", ".join(f"{label} {count}" for label, count in causes.items())
    if other:
        detail += f"{', ' if detail else ''}other {other}: set accelerate.explain = true to see them"
    total = sum(breaks.values())
    return f"compile: {graphs} graphs, {total} graph breaks" + (f" ({detail})" if detail else "")
