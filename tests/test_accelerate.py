"""The acceleration plugins (accelerate, compile, cudagraph, precision): each mode trains exactly as
eager does, with a user's loss and a regularizer plugin, and refuses what it cannot do.

Eager is the oracle: 50 steps on a fixed seed, compared step by step. torch.compile is slow to
compile on CPU, so the compiled runs are few and small; CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import torch
from torch import nn

import engine
from tests.helpers import read_jsonl

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo reuses a compiled step across runs of one process (its guards are on types and
    shapes): each test starts from an empty cache, so that reports and errors are its own."""
    torch._dynamo.reset()


MINE = ("accelerate", "compile", "cudagraph", "precision")
COMPILE = {"name": "compile"}
GRAPHS = {"name": "cudagraph"}
BF16 = {"name": "bf16-mixed"}


class Recorder:
    """Keeps every step's loss (on the device, as the metrics plugin does) and reads them at the end."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    @engine.hookimpl
    def after_step(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def values(self) -> list[float]:
        return torch.stack(self.losses).tolist()


class PenalizedCrossEntropy:
    """A user's loss component from this test module: cross-entropy plus a penalty on large logits."""

    @engine.hookimpl
    def register_components(self):
        def penalized_ce(penalty: float = 0.01):
            def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return nn.functional.cross_entropy(output, target) + penalty * output.pow(2).mean()

            return loss

        return {"loss": {"penalized_ce": penalized_ce}}


class L2:
    """A second plugin adding a regularizer term."""

    @engine.hookimpl
    def compute_loss(self, trainer: engine.Trainer) -> dict[str, torch.Tensor]:
        return {"l2": 1e-3 * sum(p.pow(2).sum() for p in trainer.model.parameters())}


def train(job: dict[str, Any], *extra: Any, **overrides: Any) -> tuple[list[float], engine.Result]:
    recorder = Recorder()
    job = {"log": {"progress": False, "every": 10}, **job, **overrides, "run_name": ""}  # a fresh directory each
    result = engine.run(job, plugins=[recorder, *extra])
    return recorder.values(), result


def close(actual: list[float], expected: list[float], rtol: float, atol: float = 1e-6) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert math.isclose(a, e, rel_tol=rtol, abs_tol=atol), f"step {step}: {a} != {e}"


TUTORIAL = {"epochs": 50, "run_name": "tutorial"}
# A small classification MLP: 3 full batches and a short one (8 samples) per epoch, accumulation
# windows of 2 (the last one shorter), clipping and a per-step schedule: every path of the step.
SMALL = {
    "epochs": 13,
    "run_name": "small",
    "grad_accumulation": 2,
    "data": {"name": "classification", "n_samples": 200, "n_features": 8, "batch_size": 64},
    "model": {"name": "mlp", "hidden": [16]},
    "loss": {"name": "penalized_ce"},
    "grad_clip": {"max_norm": 0.5},
    "scheduler": {"name": "warmup_cosine", "warmup_steps": 5},
    "optimizer": {"name": "adamw"},  # AdamW keeps a default its constructor does not take
}


# --- compile (CPU) ---------------------------------------------------------------------------


def test_compile_matches_eager_on_the_tutorial_job_without_unexpected_graph_breaks(capsys):
    eager, _ = train(TUTORIAL)
    compiled, _ = train(TUTORIAL, accelerate=COMPILE)
    close(compiled, eager, rtol=1e-5)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    # The breaks every compiled step has: Dynamo cannot trace backward, torch.optim splits its
    # step, and the default (fused) optimizer kernel is opaque to it.
    assert report == ["compile: 2 graphs, 5 graph breaks (backward 1, torch.optim step boundary 2, fused optimizer 2)"]
    torch._dynamo.reset()
    compiled, _ = train(TUTORIAL, accelerate=COMPILE, optimizer={"impl": "for_loop"})
    close(compiled, eager, rtol=1e-5)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    assert report == ["compile: 3 graphs, 3 graph breaks (backward 1, torch.optim step boundary 2)"]


def test_compile_matches_eager_with_a_user_loss_a_regularizer_accumulation_and_a_short_batch(capsys):
    eager, eager_result = train(SMALL, PenalizedCrossEntropy(), L2())
    compiled, result = train(SMALL, PenalizedCrossEntropy(), L2(), accelerate=COMPILE)
    assert len(eager) == 13 * 4
    close(compiled, eager, rtol=1e-5)
    assert "l2" in result.metrics
    # The compiled step's learning rate is a tensor, read back with the losses at each logging point.
    logged = [[line["lr"] for line in read_jsonl(run.run_dir / "metrics.jsonl")] for run in (result, eager_result)]
    assert len(logged[0]) == 2 and logged[0][0] > 0 and logged[0] == pytest.approx(logged[1], rel=1e-6)
    out = capsys.readouterr().out
    assert "other" not in out  # the user's loss and the regularizer compile without a break
    # Each accumulation window compiles once (a graph before and after backward), not once per epoch.
    more = re.search(r"compile: (\d+) more graphs", out)
    assert more is not None and int(more.group(1)) <= 4


def test_compile_with_bf16_autocast_matches_eager_bf16():
    eager, _ = train(TUTORIAL, precision=BF16)
    compiled, _ = train(TUTORIAL, precision=BF16, accelerate=COMPILE)
    close(compiled, eager, rtol=1e-2)


def test_compile_settings_are_checked_by_their_schema():
    with pytest.raises(engine.ConfigError, match=r"accelerate\.mode: expected one of 'default', .*\(did you mean"):
        engine.load_config({**TUTORIAL, "accelerate": {"name": "compile", "mode": "max-autotun"}})
    # Dynamo cannot trace backward, so one graph for the whole step is out of reach: said so, by
    # name, when the first step is traced (the run has begun: exit 1).
    with pytest.raises(
        engine.TrainingError, match=r"epoch 1, step 1: plugin 'compile': accelerate\.fullgraph = true: .*backward"
    ):
        engine.run({**TUTORIAL, "accelerate": {"name": "compile", "fullgraph": True}})


class Snapshot:
    """Keeps the optimizer state of one step and interrupts the run there, as a kill would."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, None

    @engine.hookimpl
    def after_step(self, state, trainer):
        if state.step == self.at:
            components = (trainer.module, trainer.optimizer, trainer.scheduler, trainer.state)
            self.saved = copy.deepcopy([part.state_dict() for part in components])
            raise KeyboardInterrupt


@pytest.mark.parametrize("accelerate", [{"name": "eager"}, COMPILE])
def test_a_resumed_run_keeps_the_optimizer_state_under_every_cpu_mode(accelerate):
    """The setup chain builds the final optimizer before anything is restored into it."""
    job = {**SMALL, "epochs": 3, "accelerate": accelerate, "log": {"progress": False}}
    whole, _ = train({**job, "run_name": "whole"}, PenalizedCrossEntropy())
    snapshot = Snapshot(at=6)
    with pytest.raises(KeyboardInterrupt):
        engine.run({**job, "run_name": "killed"}, plugins=[PenalizedCrossEntropy(), snapshot])
    model_state, optimizer_state, scheduler_state, loop_state = snapshot.saved
    assert len(optimizer_state["state"]) == 4  # Adam's moments for every parameter tensor

    trainer = engine.setup({**job, "run_name": "resumed"}, plugins=[PenalizedCrossEntropy()])
    trainer.module.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.scheduler.load_state_dict(scheduler_state)
    trainer.state.load_state_dict(loop_state)
    recorder = Recorder()
    trainer.plugins.pm.register(recorder)
    trainer.after_step.insert(0, lambda loss, **_: recorder.losses.append(loss))
    trainer.fit()
    assert len(trainer.optimizer.state_dict()["state"]) == 4
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 6  # 12 batches, windows of 2
    close(recorder.values(), whole[6:], rtol=1e-5)


# --- precision (CPU) -------------------------------------------------------------------------


def test_bf16_mixed_follows_float32_within_bf16_tolerance():
    full, _ = train(TUTORIAL)
    half, _ = train(TUTORIAL, precision=BF16)
    close(half, full, rtol=2e-2)


def test_fp16_mixed_scales_the_loss_and_trains():
    trainer = engine.setup({**TUTORIAL, "precision": {"name": "16-mixed"}, "log": {"progress": False}})
    result = trainer.fit()
    scaler = trainer.precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() < 65536.0  # the first steps overflowed fp16 and were skipped
    full, _ = train(TUTORIAL)
    assert result.metrics["loss"] == pytest.approx(full[-1], rel=0.1)


def test_unknown_precision_is_a_config_error():
    with pytest.raises(engine.ConfigError, match=r"precision.name: unknown precision '8' \(choose one of: 16-mixed"):
        engine.load_config({**TUTORIAL, "precision": {"name": "8"}})


def test_without_the_precision_plugin_the_run_is_full_precision():
    trainer = engine.setup(TUTORIAL, blocked=["precision"])
    assert trainer.config["precision"]["name"] is None
    assert trainer.precision.dtype is None and trainer.precision.scaler is None


# --- accelerate and auto (CPU) -----------------------------------------------------------------


def test_cudagraph_on_cpu_is_a_one_line_config_error():
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup({**TUTORIAL, "device": "cpu", "accelerate": GRAPHS})
    assert str(raised.value) == "accelerate.name = 'cudagraph' needs a CUDA device; this run's device is cpu"


def test_unknown_mode_and_blocked_mode_plugin_are_config_errors():
    with pytest.raises(engine.ConfigError, match=r"accelerate.name: unknown accelerate 'fast' \(choose one of: auto"):
        engine.load_config({**TUTORIAL, "accelerate": {"name": "fast"}})
    with pytest.raises(
        engine.ConfigError, match=r"accelerate.name: unknown accelerate 'compile' \(choose one of: auto,"
    ):
        engine.load_config({**TUTORIAL, "accelerate": COMPILE}, blocked=["compile"])


def test_the_engine_trains_as_before_with_every_acceleration_plugin_blocked():
    eager, _ = train(TUTORIAL)
    recorder = Recorder()
    engine.run({**TUTORIAL, "log": {"progress": False}}, plugins=[recorder], blocked=MINE)
    assert recorder.values() == eager


def test_auto_times_the_candidates_prints_the_choice_and_trains_as_eager(capsys):
    eager, _ = train(TUTORIAL)
    chosen, _ = train(TUTORIAL, accelerate={"name": "auto", "steps": 8})
    close(chosen, eager, rtol=1e-5)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:")]
    assert len(lines) == 1
    assert lines[0].startswith("accelerate auto: eager (per step: eager ") and " us" in lines[0]
    assert "compile skipped: the run takes about" in lines[0]  # 50 tiny steps never pay for a compile


def test_auto_takes_its_candidates_from_the_component_table(capsys):
    """Candidates are `accelerate` components of other plugins: blocking one removes it from the trials."""
    train(TUTORIAL, accelerate={"name": "auto", "steps": 8, "compile_min_s": 0.0})
    with_compile = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert "compile " in with_compile and "eager " in with_compile
    recorder = Recorder()
    engine.run(
        {**TUTORIAL, "accelerate": {"name": "auto", "steps": 8, "compile_min_s": 0.0}, "log": {"progress": False}},
        plugins=[recorder],
        blocked=["compile"],
    )
    without = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert "compile" in without and "skipped" in without  # named, with the reason
    assert len(recorder.values()) == 50


class Counted:
    """A third party's accelerate component: the eager step, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    @engine.hookimpl
    def register_components(self):
        return {"accelerate": {"counted": lambda: self}}

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
    chosen, _ = train(TUTORIAL, plugin, accelerate={"name": "auto", "steps": 8, "candidates": ["eager", "counted"]})
    assert chosen == eager  # the same maths, whichever ran each step
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert re.fullmatch(r"accelerate auto: (eager|counted) \(per step: eager [\d.]+ us, counted [\d.]+ us\)", line)
    assert plugin.calls >= 5 + 8  # its untimed steps and its timed rounds, at least
    with pytest.raises(engine.ConfigError, match=r"^accelerate.candidates: 'auto' cannot be a candidate of itself$"):
        train(TUTORIAL, accelerate={"name": "auto", "candidates": ["eager", "auto"]})


# --- CUDA ------------------------------------------------------------------------------------

CUDA_SMALL = {**SMALL, "device": "cuda"}


@cuda
@pytest.mark.cuda
def test_cudagraph_matches_eager_with_a_user_loss_regularizer_schedule_clipping_and_accumulation():
    eager, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2())
    graphed, result = train(CUDA_SMALL, PenalizedCrossEntropy(), L2(), accelerate=GRAPHS)
    close(graphed, eager, rtol=1e-4, atol=1e-5)
    assert "l2" in result.metrics


@cuda
@pytest.mark.cuda
def test_cudagraph_follows_the_learning_rate_schedule():
    job = {**CUDA_SMALL, "grad_accumulation": 1, "grad_clip": {"max_norm": 0.0}}
    constant, _ = train({**job, "scheduler": {"name": "none"}}, PenalizedCrossEntropy(), accelerate=GRAPHS)
    eager, _ = train(job, PenalizedCrossEntropy())
    graphed, _ = train(job, PenalizedCrossEntropy(), accelerate=GRAPHS)
    close(graphed, eager, rtol=1e-4, atol=1e-5)
    assert graphed[-1] != pytest.approx(constant[-1], rel=1e-3)  # the schedule is not frozen into the graph


@cuda
@pytest.mark.cuda
def test_cudagraph_refuses_a_scheduler_that_changes_a_non_tensor_setting():
    job = {**CUDA_SMALL, "grad_accumulation": 1, "scheduler": {"name": "onecycle"}}
    with pytest.raises(engine.TrainingError, match="'betas'"):
        train(job, PenalizedCrossEntropy(), accelerate=GRAPHS)


class NaNData:
    """A regression set whose 56th sample has a NaN target: batch 6 of epoch 1 (10 per batch)."""

    @engine.hookimpl
    def register_components(self):
        def with_nan(seed: int):
            x = torch.randn(100, 1, generator=torch.Generator().manual_seed(seed))
            y = 2 * x + 3
            y[55] = float("nan")
            return x, y

        return {"data": {"with_nan": with_nan}}


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["cudagraph", "compile"])
def test_a_nan_loss_is_reported_at_its_step(mode):
    job = {"epochs": 3, "device": "cuda", "data": {"name": "with_nan", "batch_size": 10, "shuffle": False}}
    with pytest.raises(engine.TrainingError, match="epoch 1, step 6"):
        train(job, NaNData(), accelerate={"name": mode})


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cudagraph_with_mixed_precision_matches_eager(precision):
    job = {**CUDA_SMALL, "precision": {"name": precision}}
    eager, _ = train(job, PenalizedCrossEntropy(), L2())
    graphed, _ = train(job, PenalizedCrossEntropy(), L2(), accelerate=GRAPHS)
    close(graphed, eager, rtol=1e-2, atol=1e-3)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("accelerate", [COMPILE, GRAPHS])
def test_a_resumed_run_keeps_the_optimizer_state_on_cuda(accelerate):
    job = {**CUDA_SMALL, "epochs": 3, "accelerate": accelerate, "log": {"progress": False}}
    snapshot = Snapshot(at=6)
    with pytest.raises(KeyboardInterrupt):
        engine.run({**job, "run_name": "killed"}, plugins=[PenalizedCrossEntropy(), snapshot])
    trainer = engine.setup({**job, "run_name": "resumed"}, plugins=[PenalizedCrossEntropy()])
    trainer.optimizer.load_state_dict(snapshot.saved[1])
    trainer.fit()
    assert len(trainer.optimizer.state_dict()["state"]) == 4


@cuda
@pytest.mark.cuda
def test_compile_on_cuda_matches_eager():
    eager, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2())
    compiled, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2(), accelerate=COMPILE)
    close(compiled, eager, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.cuda
def test_auto_on_cuda_tries_cudagraph(capsys):
    train({**CUDA_SMALL, "epochs": 40}, PenalizedCrossEntropy(), accelerate={"name": "auto", "steps": 8})
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert "cudagraph" in line
