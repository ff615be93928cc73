"""plugins/accelerate.py: ``eager`` (the core's step) and ``auto``, which times the other
``accelerate`` components on the run's first steps and keeps the fastest by the median of
interleaved rounds; both train exactly as eager does, and a run resumed under them continues
exactly. The timing rules are tested on a fake clock, without a run."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from engine_plugins import accelerate

import engine
from tests.plugins.accelerated import SMALL, TUTORIAL, Losses, PenalizedCrossEntropy, close, resumes_exactly, train

MINE = ("accelerate", "compile", "cudagraph", "precision")


def test_unknown_mode_and_blocked_mode_plugin_are_config_errors():
    with pytest.raises(engine.ConfigError, match=r"accelerate.name: unknown accelerate 'fast' \(choose one of: auto"):
        engine.load_config({**TUTORIAL, "accelerate": {"name": "fast"}})
    with pytest.raises(
        engine.ConfigError, match=r"accelerate.name: unknown accelerate 'compile' \(choose one of: auto,"
    ):
        engine.load_config({**TUTORIAL, "accelerate": {"name": "compile"}}, blocked=["compile"])


def test_the_engine_trains_as_before_with_every_acceleration_plugin_blocked():
    eager, _ = train(TUTORIAL)
    recorder = Losses()
    engine.run({**TUTORIAL, "log": {"progress": False}}, plugins=[recorder], blocked=MINE)
    assert recorder.values() == eager


def test_a_resumed_eager_run_restores_the_optimizer_state_and_continues_exactly(tmp_path):
    """The setup chain builds the final optimizer before the checkpoint is restored into it."""
    resumes_exactly({**SMALL, "epochs": 3}, 6, tmp_path / "runs", PenalizedCrossEntropy())


# --- auto in a run ----------------------------------------------------------------------------------


def auto_line(out: str) -> str:
    [line] = [line for line in out.splitlines() if line.startswith("accelerate auto:")]
    return line


def test_auto_times_the_candidates_prints_the_choice_and_trains_as_eager(capsys):
    eager, _ = train(TUTORIAL)
    chosen, _ = train(TUTORIAL, accelerate={"name": "auto", "steps": 10})
    close(chosen, eager, rtol=1e-5)  # the optimizer is every candidate's (compile's: a tensor rate)
    line = auto_line(capsys.readouterr().out)
    # 50 tiny steps never pay for a compile; off CUDA, cudagraph is no candidate at all.
    expected = r"accelerate auto: eager \(median per step: eager [\d.]+ us; compile skipped: the run takes about "
    assert re.fullmatch(expected + r"[\d.]+ s eager\)", line)


def test_auto_takes_its_candidates_from_the_component_table(capsys):
    """Candidates are `accelerate` components of other plugins: blocking one removes it from the trials."""
    recorder = Losses()
    engine.run(
        {**TUTORIAL, "accelerate": {"name": "auto", "steps": 10}, "log": {"progress": False}},
        plugins=[recorder],
        blocked=["compile"],
    )
    line = auto_line(capsys.readouterr().out)
    assert "compile skipped: accelerate.name: unknown accelerate 'compile'" in line  # named, with the reason
    assert len(recorder.values()) == 50


class Counted:
    """A third party's accelerate component: the eager step, counting its calls."""

    build_seconds = 0.0

    def __init__(self) -> None:
        self.calls = 0

    @engine.hookimpl
    def register_components(self):
        return {"accelerate": {"counted": lambda: self}}

    def unavailable(self) -> str | None:
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def step(self, step: engine.Step) -> engine.Step:
        def counted(batch: engine.Batch, window: engine.Window) -> Any:
            self.calls += 1
            return step(batch, window)

        return counted


def test_auto_tries_a_third_partys_candidate_and_refuses_itself(capsys):
    eager, _ = train(TUTORIAL)
    plugin = Counted()
    chosen, _ = train(TUTORIAL, plugin, accelerate={"name": "auto", "steps": 10, "candidates": ["eager", "counted"]})
    assert chosen == eager  # the same maths, whichever ran each step
    line = auto_line(capsys.readouterr().out)
    assert re.fullmatch(
        r"accelerate auto: (eager|counted) \(median per step: eager [\d.]+ us, counted [\d.]+ us\)", line
    )
    ran = 5 + 10 + (50 - 1 - 2 - 5 - 20 if line.startswith("accelerate auto: counted") else 0)
    assert plugin.calls == ran  # its untimed steps and 5 rounds of 2, then every step if chosen
    with pytest.raises(engine.ConfigError, match=r"^accelerate.candidates: 'auto' cannot be a candidate of itself$"):
        train(TUTORIAL, accelerate={"name": "auto", "candidates": ["eager", "auto"]})


def test_a_resumed_auto_run_keeps_the_choice_it_made_without_timing_again(capsys):
    """The path auto chose is part of the run's course (its numerics): the checkpoint keeps it."""
    job = {**TUTORIAL, "accelerate": {"name": "auto", "steps": 10, "candidates": ["eager", "counted"]}}
    job = {**job, "run_name": "auto", "checkpoint": {"every_epochs": 25}}
    first = Counted()
    result = engine.run(job, plugins=[first])
    chosen = auto_line(capsys.readouterr().out).split()[2]
    saved = engine.runs.load(result.run_dir / "checkpoints" / "step-000000050.pt", engine.runs.CHECKPOINT_FORMAT)
    assert saved["plugins"]["accelerate"] == {"chosen": chosen}
    resumed = Counted()
    engine.run(resume=result.run_dir, overrides=["epochs=60"], plugins=[resumed])
    assert auto_line(capsys.readouterr().out) == f"accelerate auto: {chosen} (the run's choice, kept on resume)"
    assert resumed.calls == (10 if chosen == "counted" else 0)  # no trial: every step on the path chosen


def test_a_candidate_that_cannot_run_here_is_no_candidate():
    class Elsewhere(Counted):
        def unavailable(self) -> str | None:
            return "it needs a device this machine lacks"

    trainer = engine.setup(
        {**TUTORIAL, "accelerate": {"name": "auto", "candidates": ["eager", "counted"]}}, plugins=[Elsewhere()]
    )
    assert trainer.acceleration.others == {}
    with pytest.raises(
        engine.ConfigError, match=r"^accelerate.name = 'counted': it needs a device this machine lacks$"
    ):
        engine.setup({**TUTORIAL, "accelerate": {"name": "counted"}}, plugins=[Elsewhere()])


# --- auto's rules, on a fake clock -------------------------------------------------------------------

PER_ROUND = 4  # steps = 20: 5 rounds of 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


class Costly:
    """A way to run the step whose each call costs `costs(call)` seconds of the fake clock (call:
    0-based). A candidate runs `own` (the core's step, as a compiled one does) in place of the
    eager step it is given, whose cost is eager's."""

    def __init__(self, clock: Clock, costs, build_seconds: float = 0.0, own: Any = None) -> None:
        self.clock, self.costs, self.build_seconds, self.own, self.calls = clock, costs, build_seconds, own, 0

    def unavailable(self) -> str | None:
        return None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def step(self, step: engine.Step) -> engine.Step:
        inner = self.own or step

        def timed(batch: engine.Batch, window: engine.Window) -> Any:
            self.clock.now += self.costs(self.calls)
            self.calls += 1
            return inner(batch, window)

        return timed


def timed_round(call: int) -> int | None:
    """The timed round (0-based) a trial's call belongs to: every trial's first 5 calls are untimed
    (eager's: a warm-up step and the round that estimates the run's length)."""
    return (call - 5) // PER_ROUND if call >= 5 else None


class Slowest:
    """The collectives of a run of two processes, where the other measures `elsewhere(seconds)`."""

    rank, world_size = 0, 2

    def __init__(self, elsewhere) -> None:
        self.elsewhere = elsewhere

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        assert op == "max"
        return tensor.copy_(torch.maximum(tensor, self.elsewhere(tensor)))


def choose(monkeypatch, eager_costs, others, epochs: int = 100, distributed: Any = None) -> str:
    """The trial auto chooses on the fake clock: eager's step costs `eager_costs(call)`, each of
    `others` ({name: (costs, build_seconds)}) its own; margin 0.02, max_build_share 0.05."""
    clock = Clock()
    monkeypatch.setattr(accelerate, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    cpu = torch.device("cpu")
    trainer = SimpleNamespace(
        device=cpu,
        length=engine.RunLength(epochs, 10, epochs * 10, epochs * 10),
        rank=0,
        distributed=distributed or engine.OneProcess(cpu),
    )
    output = (torch.tensor(0.0), {})

    def core(batch: engine.Batch, window: engine.Window) -> Any:
        return output

    built = {name: Costly(clock, *costs, own=core) for name, costs in others.items()}
    auto = accelerate.Auto(trainer, built, [], PER_ROUND, 0.02, 0.05)
    step = auto.step(Costly(clock, eager_costs).step(core))
    batch, window = engine.Batch(None, None), engine.Window(True, True, 1.0)
    steps = 0
    while auto.chosen is None:
        assert step(batch, window) is output
        steps += 1
    # Eager's warm-up step and the round that estimates the run; each candidate's untimed steps;
    # then the rounds of every trial in turn, interleaved.
    trials = len(auto.trials)
    assert steps == 1 + PER_ROUND + accelerate.UNTIMED * (trials - 1) + accelerate.ROUNDS * PER_ROUND * trials
    assert step(batch, window) is output  # the chosen one, from then on
    [chosen] = [trial.name for trial in auto.trials if trial.step is auto.chosen]
    return chosen


def lucky(seconds: float, round_seconds: float, round_index: int):
    """`seconds` a step, but `round_seconds` in one timed round (a burst of load, or a lucky quiet spell)."""
    return lambda call: round_seconds if timed_round(call) == round_index else seconds


def test_auto_judges_each_candidate_by_its_median_round(monkeypatch, capsys):
    # Eager is 2 s a step with one lucky round of 0.1 s; "fast" is 1 s with one round under load,
    # 100 s. The medians choose fast; the best round would choose eager, and so would the mean.
    chosen = choose(monkeypatch, lucky(2.0, 0.1, 2), {"fast": (lucky(1.0, 100.0, 1), 0.0)})
    assert chosen == "fast"
    line = capsys.readouterr().out.strip()
    assert line == "accelerate auto: fast (median per step: eager 2000000.0 us, fast 1000000.0 us)"


def test_auto_keeps_eager_unless_a_candidate_is_faster_by_more_than_the_margin(monkeypatch):
    assert choose(monkeypatch, lambda call: 2.0, {"close": (lambda call: 1.97, 0.0)}) == "eager"  # 1.5 % faster
    assert choose(monkeypatch, lambda call: 2.0, {"close": (lambda call: 1.95, 0.0)}) == "close"  # 2.5 % faster


def test_auto_skips_a_candidate_whose_build_the_run_is_too_short_to_pay(monkeypatch, capsys):
    # Eager's estimate: 2 s x 10 steps an epoch x the epochs; a 30 s build needs a run over 600 s.
    assert choose(monkeypatch, lambda call: 2.0, {"compiled": (lambda call: 1.0, 30.0)}, epochs=40) == "compiled"
    assert choose(monkeypatch, lambda call: 2.0, {"compiled": (lambda call: 1.0, 30.0)}, epochs=20) == "eager"
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == (
        "accelerate auto: eager (median per step: eager 2000000.0 us; "
        "compiled skipped: the run takes about 400.0 s eager)"
    )


def test_with_several_processes_auto_decides_by_the_slowest_process(monkeypatch):
    # "fast" is twice as fast here, but twice as slow as eager in the other process: every process
    # takes the slowest one's times, and so makes the same choice.
    assert choose(monkeypatch, lambda call: 2.0, {"fast": (lambda call: 1.0, 0.0)}) == "fast"
    other = Slowest(lambda seconds: seconds * 4 if seconds.item() < 1.5 else seconds)
    assert choose(monkeypatch, lambda call: 2.0, {"fast": (lambda call: 1.0, 0.0)}, distributed=other) == "eager"
