"""``accelerate = "eager" | "compile" | "cudagraph" | "auto"``: which acceleration wraps the train step.

"eager" (the default) leaves the step alone. "compile" and "cudagraph" are done by the plugins of
those names (``plugins/compile.py``, ``plugins/cudagraph.py``); this one checks that the chosen
one is loaded. "auto" measures, on the run's first steps, each candidate of ``[auto] candidates``
that applies here, keeps the fastest and prints the choice with the per-step times:

- ``eager``: the step as configured;
- ``fused``: the eager step with the optimizer's fused kernel (when it has one here and is not
  already fused);
- ``compile``: the compiled step; tried only when the run is long enough for a compile to pay
  (its eager time, measured, above ``[auto] compile_min_s``): a compile costs seconds;
- ``cudagraph``: the whole step captured in a CUDA graph (CUDA only).

The trial steps are real training steps of the same maths, so trying costs no work. A candidate
replaces eager only when it is faster by more than ``[auto] margin``, so that timing noise never
leaves a run slower than eager. The choice then replaces ``trainer.step`` itself: after the trials
the loop calls the chosen step with no wrapper in between.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

import engine

Step = Callable[[engine.Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
MODES = ("eager", "compile", "cudagraph", "auto")
CANDIDATES = ("eager", "fused", "compile", "cudagraph")
ROUNDS = 4  # timed rounds per candidate; the fastest round counts (as timeit does)


@engine.hookimpl
def register_settings():
    return {
        "": {"accelerate": "eager"},
        "auto": {"candidates": list(CANDIDATES), "steps": 20, "margin": 0.02, "compile_min_s": 60.0},
    }


@engine.hookimpl(tryfirst=True)  # before the scheduler is built: cudagraph may rebuild the optimizer
def on_run_start(trainer: engine.Trainer) -> None:
    mode = trainer.config["accelerate"]
    if mode not in MODES:
        raise engine.ConfigError(f"accelerate: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("compile", "cudagraph") and trainer.plugins.pm.get_plugin(mode) is None:
        raise engine.ConfigError(f"accelerate = {mode!r}: plugin {mode!r} is blocked or not installed")
    if mode == "auto":
        settings = trainer.config["auto"]
        unknown = [name for name in settings["candidates"] if name not in CANDIDATES]
        if unknown or not settings["candidates"]:
            raise engine.ConfigError(f"auto.candidates: expected some of {', '.join(CANDIDATES)}, got {unknown}")
        if settings["steps"] < ROUNDS:
            raise engine.ConfigError(f"auto.steps: must be at least {ROUNDS}, got {settings['steps']}")
        if can_graph(trainer):
            # A graph-safe optimizer must exist before the scheduler binds to it.
            trainer.plugins.pm.get_plugin("cudagraph").prepare(trainer)


@engine.hookimpl(trylast=True)
def wrap_step(step: Step, trainer: engine.Trainer) -> Step | None:
    if trainer.config["accelerate"] != "auto":
        return None
    return Auto(step, trainer)


class Candidate:
    """One way to run the step: how to set the optimizer up for it, and the step itself."""

    def __init__(self, name: str, step: Step, untimed: int, activate: Callable[[], None]) -> None:
        self.name, self.step, self.untimed, self.activate = name, step, untimed, activate
        self.seconds: float | None = None  # per step, the fastest round


class Auto:
    """The step during the trials: runs each candidate in turn, then hands the loop the fastest."""

    def __init__(self, step: Step, trainer: engine.Trainer) -> None:
        self.trainer, self.settings = trainer, trainer.config["auto"]
        self.cuda = trainer.device.type == "cuda"
        wanted = self.settings["candidates"]
        optimizer = trainer.optimizer
        flags = [{"fused": group.get("fused"), "foreach": group.get("foreach")} for group in optimizer.param_groups]

        def configured() -> None:
            for group, original in zip(optimizer.param_groups, flags):
                group.update(original)

        def fused() -> None:
            for group in optimizer.param_groups:
                group.update(fused=True, foreach=False)

        self.candidates: list[Candidate] = []
        self.candidates.append(Candidate("eager", step, 1, configured))  # always: the baseline
        if "fused" in wanted and can_fuse(trainer):
            self.candidates.append(Candidate("fused", step, 1, fused))
        self.skipped: list[str] = []
        self.compiler = trainer.plugins.pm.get_plugin("compile") if "compile" in wanted else None
        self.graphs: Any = None
        if can_graph(trainer):
            self.graphs = trainer.plugins.pm.get_plugin("cudagraph")
            untimed = trainer.config["cudagraph"]["warmup"] + 1
            self.candidates.append(Candidate("cudagraph", self.graphs.accelerate(step, trainer), untimed, configured))
        self.eager, self.index, self.count, self.rounds = step, 0, 0, []
        self.started = 0.0

    def __call__(self, batch: engine.Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        candidate = self.candidates[self.index]
        if self.count == 0:
            candidate.activate()
        per_round = self.settings["steps"] // ROUNDS
        timed = self.count - candidate.untimed
        if timed >= 0 and timed % per_round == 0:
            self.started = self.clock()
        result = candidate.step(batch)
        self.count += 1
        timed += 1
        if timed > 0 and timed % per_round == 0:
            self.rounds.append((self.clock() - self.started) / per_round)
            if len(self.rounds) == ROUNDS:
                self.finish(candidate)
        return result

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # timing a window of steps needs the device to have caught up
        return time.perf_counter()

    def finish(self, candidate: Candidate) -> None:
        """Record `candidate`'s time; go on to the next candidate, or choose."""
        candidate.seconds = min(self.rounds)
        self.rounds, self.count = [], 0
        if candidate is self.candidates[0] and self.compiler is not None:
            self.add_compile(candidate.seconds)
        self.index += 1
        if self.index < len(self.candidates):
            return
        eager = self.candidates[0]
        best = min(self.candidates, key=lambda c: c.seconds if c.seconds is not None else float("inf"))
        if best.seconds > eager.seconds * (1 - self.settings["margin"]):
            best = eager
        best.activate()
        self.trainer.step = best.step
        times = ", ".join(f"{c.name} {c.seconds * 1e6:.1f} us" for c in self.candidates)
        skipped = "".join(f"; {reason}" for reason in self.skipped)
        print(f"accelerate auto: {best.name} (per step: {times}{skipped})", flush=True)

    def add_compile(self, eager_seconds: float) -> None:
        trainer = self.trainer
        steps = trainer.epochs * trainer.batches_per_epoch
        estimate = eager_seconds * steps
        if estimate < self.settings["compile_min_s"]:
            self.skipped.append(f"compile skipped: the run takes about {estimate:.1f} s eager")
            return
        step = self.compiler.accelerate(self.eager, trainer)
        self.candidates.insert(self.index + 1, Candidate("compile", step, 2, self.candidates[0].activate))


def can_graph(trainer: engine.Trainer) -> bool:
    """Whether the cudagraph candidate applies: CUDA, its plugin loaded, and a GradScaler it can capture."""
    if "cudagraph" not in trainer.config["auto"]["candidates"] or trainer.device.type != "cuda":
        return False
    if trainer.plugins.pm.get_plugin("cudagraph") is None:
        return False
    # fp16's GradScaler reads a non-fused optimizer's overflow flag on the host, which no graph can hold.
    return trainer.config.get("precision") != "16-mixed" or bool(trainer.optimizer.defaults.get("fused"))


def can_fuse(trainer: engine.Trainer) -> bool:
    """Whether the optimizer has a fused kernel here that its flags can switch to in place."""
    optimizer = trainer.optimizer
    if optimizer.defaults.get("fused") or trainer.scaler is not None:
        return False
    if "fused" not in inspect.signature(type(optimizer).__init__).parameters:
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    supported = _get_fused_kernels_supported_devices()
    # Off the CPU, only capturable state keeps its step counter on the device, as fused needs.
    on_device = trainer.device.type == "cpu" or optimizer.defaults.get("capturable")
    return bool(params) and on_device and all(p.device.type in supported and p.is_floating_point() for p in params)
