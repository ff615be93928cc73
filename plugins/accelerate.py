"""The ``[accelerate]`` components ``eager`` (the default: the core's step as it is) and ``auto``.

``auto`` builds every other candidate of ``candidates`` that applies here (``compile``, and
``cudagraph`` on CUDA, by default; any component of the ``accelerate`` kind, from whichever
plugin provides it, a third party's too), measures each on the run's first steps, keeps the
fastest and prints the choice with the per-step times. A candidate that cannot be built here (its
plugin blocked, a device it needs) is reported as skipped, with the reason. The trial steps are
real training steps of the same maths, so trying costs no work.

- The optimizer is the chain of every candidate's optimizer (a graph-safe one on CUDA, a tensor
  learning rate), so that each candidate can run the same optimizer from the same state.
- ``compile`` is tried only when the run is long enough for a compile to pay: its eager time,
  measured, above ``compile_min_s`` (a compile costs seconds).
- A candidate replaces eager only when it is faster by more than ``margin``, so that timing noise
  never leaves a run slower than eager.
- With several processes, each candidate's time is the slowest process's (one all-reduce per
  trial), so that every process makes the same choices; rank 0 prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.distributed as dist

import engine

Candidate = str  # an accelerate component: eager, compile, cudagraph or another plugin's
ROUNDS = 4  # timed rounds per candidate; the fastest round counts (as timeit does)
# Steps a candidate other than eager runs before its timing starts: compiling, or cudagraph's
# default warm-up and capture.
UNTIMED = 5
Output = tuple[torch.Tensor, dict[str, torch.Tensor]]


def eager() -> None:
    """The core's train step, unchanged."""
    return None


def auto(
    trainer: engine.Trainer,
    candidates: tuple[Candidate, ...] = ("eager", "compile", "cudagraph"),
    steps: Annotated[int, engine.Range(ge=ROUNDS)] = 20,
    margin: Annotated[float, engine.Range(ge=0, lt=1)] = 0.02,
    compile_min_s: Annotated[float, engine.Range(ge=0)] = 60.0,
) -> Auto:
    """Times the candidates on the first steps and keeps the fastest (see the module docstring)."""
    others: dict[str, engine.Acceleration] = {}
    skipped: list[str] = []
    for name in dict.fromkeys(candidates):
        if name == "auto":
            raise engine.ConfigError("accelerate.candidates: 'auto' cannot be a candidate of itself")
        if name == "eager":
            continue
        if name == "cudagraph" and trainer.device.type != "cuda":
            continue  # not a candidate off CUDA: nothing to report
        try:
            others[name] = trainer.build("accelerate", name=name, trainer=trainer)
        except engine.ConfigError as error:
            skipped.append(f"{name} skipped: {error}")
    return Auto(trainer, others, skipped, steps // ROUNDS, margin, compile_min_s)


@dataclass(frozen=True)
class Default:
    name: str = "eager"


@engine.hookimpl
def register_settings():
    return {"accelerate": Default}


@engine.hookimpl
def register_components():
    return {"accelerate": {"eager": eager, "auto": auto}}


class Trial:
    """One way to run the step: its name, the step, and the steps to leave untimed (warm-up, compile)."""

    def __init__(self, name: str, step: engine.Step, untimed: int) -> None:
        self.name, self.step, self.untimed = name, step, untimed
        self.seconds: float | None = None  # per step, the fastest round


class Auto:
    """The auto acceleration: runs each candidate in turn, then the fastest for good."""

    def __init__(
        self,
        trainer: engine.Trainer,
        others: dict[str, engine.Acceleration],
        skipped: list[str],
        per_round: int,
        margin: float,
        compile_min_s: float,
    ) -> None:
        self.trainer, self.others, self.skipped = trainer, others, skipped
        self.per_round, self.margin, self.compile_min_s = per_round, margin, compile_min_s
        self.cuda = trainer.device.type == "cuda"

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for acceleration in self.others.values():
            optimizer = acceleration.optimizer(optimizer)
        return optimizer

    def step(self, step: engine.Step) -> engine.Step:
        self.eager = step
        self.trials = [Trial("eager", step, 1)]
        for name, acceleration in self.others.items():
            if name != "compile":  # compile joins once eager's time says the run is long enough for it
                self.trials.append(Trial(name, acceleration.step(step), UNTIMED))
        self.index, self.count, self.rounds, self.started = 0, 0, [], 0.0
        self.chosen: engine.Step | None = None
        return self.run

    def run(self, batch: engine.Batch, window: engine.Window) -> Output:
        if self.chosen is not None:
            return self.chosen(batch, window)
        trial = self.trials[self.index]
        timed = self.count - trial.untimed
        if timed >= 0 and timed % self.per_round == 0:
            self.started = self.clock()
        result = trial.step(batch, window)
        self.count += 1
        timed += 1
        if timed > 0 and timed % self.per_round == 0:
            self.rounds.append((self.clock() - self.started) / self.per_round)
            if len(self.rounds) == ROUNDS:
                self.finish(trial)
        return result

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # timing a window of steps needs the device to have caught up
        return time.perf_counter()

    def finish(self, trial: Trial) -> None:
        """Record `trial`'s time; go on to the next trial, or choose."""
        trial.seconds = self.slowest(min(self.rounds))
        self.rounds, self.count = [], 0
        if trial is self.trials[0] and "compile" in self.others:
            self.add_compile(trial.seconds)
        self.index += 1
        if self.index < len(self.trials):
            return
        eager = self.trials[0]
        best = min(self.trials, key=lambda t: t.seconds if t.seconds is not None else float("inf"))
        if best.seconds > eager.seconds * (1 - self.margin):
            best = eager
        self.chosen = best.step
        times = ", ".join(f"{t.name} {t.seconds * 1e6:.1f} us" for t in self.trials)
        skipped = "".join(f"; {reason}" for reason in self.skipped)
        if self.trainer.rank == 0:
            print(f"accelerate auto: {best.name} (per step: {times}{skipped})", flush=True)

    def slowest(self, seconds: float) -> float:
        """`seconds` of the slowest process of the run: the time every process then decides by."""
        if self.trainer.world_size == 1:
            return seconds
        measured = torch.tensor([seconds], dtype=torch.float64, device=self.trainer.device)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        return measured.item()

    def add_compile(self, eager_seconds: float) -> None:
        trainer = self.trainer
        estimate = eager_seconds * trainer.epochs * trainer.batches_per_epoch
        if estimate < self.compile_min_s:
            self.skipped.append(f"compile skipped: the run takes about {estimate:.1f} s eager")
            return
        self.trials.insert(self.index + 1, Trial("compile", self.others["compile"].step(self.eager), UNTIMED))
