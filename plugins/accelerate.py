"""The ``[accelerate]`` components ``eager`` (the default: the core's step as it is) and ``auto``.

``auto`` builds every other component of ``candidates`` (``compile`` and ``cudagraph`` by default;
any component of the ``accelerate`` kind, from whichever plugin provides it, a third party's too),
keeps those that apply here (`Acceleration.unavailable`), times each on the run's first steps,
keeps the fastest and prints the choice with the per-step times. A candidate that cannot be built
(its plugin blocked) is reported as skipped, with the reason. The trial steps are real training
steps of the same maths, so trying costs no work.

- The optimizer is the chain of every candidate's optimizer (a graph-safe one on CUDA, a tensor
  learning rate), so that each candidate can run the same optimizer from the same state.
- A candidate that costs seconds to build (`Acceleration.build_seconds`: a compile) is tried only
  when the run, at eager's measured speed, is long enough for it to pay: its build under
  ``max_build_share`` of the run.
- The candidates run in turn, a round of steps each, for several rounds (after their warm-up),
  and each is judged by its median round: a burst of load on a shared machine during one round
  cannot pick a path that is slower when the machine is quiet.
- A candidate replaces eager only when it is faster by more than ``margin``, so that timing noise
  never leaves a run slower than eager.
- With several processes, each round's time is the slowest process's (one all-reduce per round),
  so that every process makes the same choices; rank 0 prints it.
- The choice is the run's: its checkpoints keep it (`save_plugin_state`), and a resumed run takes
  the same path without timing again, so that it trains with the same numerics as before.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import deque
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

import torch

import engine

ROUNDS = 5  # timed rounds per candidate; the median counts
# Steps a candidate other than eager runs before its timing starts: compiling, or cudagraph's
# default warm-up and capture.
UNTIMED = 5
Output = tuple[torch.Tensor, dict[str, torch.Tensor]]


def eager() -> None:
    """The core's train step, unchanged."""
    return None


def auto(
    trainer: engine.TrainerView,
    candidates: tuple[str, ...] = ("eager", "compile", "cudagraph"),
    steps: Annotated[int, engine.Range(ge=ROUNDS)] = 20,
    margin: Annotated[float, engine.Range(ge=0, lt=1)] = 0.02,
    max_build_share: Annotated[float, engine.Range(gt=0, le=1)] = 0.05,
) -> Auto:
    """Times the candidates on the first steps and keeps the fastest (see the module docstring).
    `steps` are each candidate's timed steps, in `ROUNDS` rounds."""
    others: dict[str, engine.Acceleration] = {}
    skipped: list[str] = []
    for name in dict.fromkeys(candidates):
        if name == "auto":
            raise engine.ConfigError("accelerate.candidates: 'auto' cannot be a candidate of itself")
        if name == "eager":
            continue
        try:
            built = trainer.build("accelerate", name=name, trainer=trainer)
        except engine.ConfigError as error:
            skipped.append(f"{name} skipped: {error}")
            continue
        if built is not None and built.unavailable() is None:  # one that does not apply here is no candidate
            others[name] = built
    return Auto(trainer, others, skipped, steps // ROUNDS, margin, max_build_share)


class Accelerate:
    """Per run: the `Auto` it built, whose choice its checkpoints keep."""

    def __init__(self) -> None:
        self.auto: Auto | None = None

    @engine.hookimpl
    def register_components(self):
        @functools.wraps(auto)  # its settings are auto's parameters
        def kept(**settings: Any) -> Auto:
            self.auto = auto(**settings)
            return self.auto

        return {"default": {"accelerate": "eager"}, "accelerate": {"eager": eager, "auto": kept}}

    @engine.hookimpl
    def save_plugin_state(self) -> dict[str, Any] | None:
        if self.auto is None or self.auto.chosen_name is None:
            return None
        return {"accelerate": {"chosen": self.auto.chosen_name}}

    @engine.hookimpl
    def load_plugin_state(self, state: Mapping[str, Any]) -> None:
        if self.auto is not None and "accelerate" in state:
            self.auto.resumed = str(state["accelerate"]["chosen"])


class Trial:
    """One way to run the step: its name, the step, and its timed rounds (seconds per step)."""

    def __init__(self, name: str, step: engine.Step) -> None:
        self.name, self.step = name, step
        self.rounds: list[float] = []

    def median(self) -> float:
        return statistics.median(self.rounds)


class Segment(NamedTuple):
    """Consecutive steps of one trial; timed ones give a round."""

    trial: Trial
    steps: int
    timed: bool


class Auto:
    """The auto acceleration: runs the trials' planned segments, then the fastest for good."""

    build_seconds = 0.0

    def __init__(
        self,
        trainer: engine.TrainerView,
        others: dict[str, engine.Acceleration],
        skipped: list[str],
        per_round: int,
        margin: float,
        max_build_share: float,
    ) -> None:
        self.trainer, self.others, self.skipped = trainer, others, skipped
        self.per_round, self.margin, self.max_build_share = per_round, margin, max_build_share
        self.cuda = trainer.device.type == "cuda"
        self.resumed: str | None = None  # the choice the run made before it was resumed
        self.chosen_name: str | None = None

    def unavailable(self) -> str | None:
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for acceleration in self.others.values():
            optimizer = acceleration.optimizer(optimizer)
        return optimizer

    def step(self, step: engine.Step) -> engine.Step:
        self.eager = Trial("eager", step)
        self.trials = [self.eager]
        # First eager alone: one step to warm up, then a round whose time says how long the run is.
        self.plan = deque([Segment(self.eager, 1, False), Segment(self.eager, self.per_round, True)])
        self.joined, self.done, self.started = False, 0, 0.0
        self.chosen: engine.Step | None = None
        if self.resumed is not None:
            self.keep(self.resumed)
        return self.run

    def keep(self, name: str) -> None:
        """The choice a resumed run made before: no timing, the same numerics."""
        if name != "eager" and name not in self.others:
            self.say(f"the run chose {name}, which cannot run here: timing the candidates again")
            return
        self.chosen = self.eager.step if name == "eager" else self.others[name].step(self.eager.step)
        self.chosen_name = name
        self.say(f"{name} (the run's choice, kept on resume)")

    def run(self, batch: engine.Batch, window: engine.Window) -> Output:
        if self.chosen is not None:
            return self.chosen(batch, window)
        segment = self.plan[0]
        if self.done == 0 and segment.timed:
            self.started = self.clock()
        result = segment.trial.step(batch, window)
        self.done += 1
        if self.done == segment.steps:
            self.plan.popleft()
            self.done = 0
            if segment.timed:
                segment.trial.rounds.append(self.slowest((self.clock() - self.started) / segment.steps))
            if segment.timed and not self.joined:  # eager's first timed round says how long the run is
                self.join()
            if not self.plan:
                self.choose()
        return result

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # timing a round of steps needs the device to have caught up
        return time.perf_counter()

    def slowest(self, seconds: float) -> float:
        """`seconds` of the slowest process of the run: the time every process then decides by."""
        measured = torch.tensor([seconds], dtype=torch.float64, device=self.trainer.device)
        return self.trainer.distributed.all_reduce(measured, "max").item()

    def join(self) -> None:
        """Once eager's first round is timed: the candidates that pay for their build in a run this
        long, each warmed up, then rounds of every trial in turn."""
        self.joined = True
        trainer = self.trainer
        estimate = self.eager.rounds[0] * trainer.length.batches
        for name, acceleration in self.others.items():
            if acceleration.build_seconds > self.max_build_share * estimate:
                self.skipped.append(f"{name} skipped: the run takes about {estimate:.1f} s eager")
            else:
                self.trials.append(Trial(name, acceleration.step(self.eager.step)))
        self.eager.rounds.clear()
        self.plan.extend(Segment(trial, UNTIMED, False) for trial in self.trials[1:])
        for _ in range(ROUNDS):
            self.plan.extend(Segment(trial, self.per_round, True) for trial in self.trials)

    def choose(self) -> None:
        eager = self.eager
        best = min(self.trials, key=Trial.median)
        if best.median() > eager.median() * (1 - self.margin):
            best = eager
        self.chosen, self.chosen_name = best.step, best.name
        times = ", ".join(f"{trial.name} {trial.median() * 1e6:.1f} us" for trial in self.trials)
        skipped = "".join(f"; {reason}" for reason in self.skipped)
        self.say(f"{best.name} (median per step: {times}{skipped})")

    def say(self, line: str) -> None:
        if self.trainer.rank == 0:
            print(f"accelerate auto: {line}", flush=True)
