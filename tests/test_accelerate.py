"""The acceleration plugins (accelerate, compile, cudagraph, precision): each mode trains exactly as
eager does, with a user's loss and a regularizer plugin, and refuses what it cannot do.

Eager is the oracle: 50 steps on a fixed seed, compared step by step. torch.compile is slow to
compile on CPU, so the compiled runs are few and small; CUDA tests skip cleanly without a GPU.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

import engine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MINE = ("accelerate", "compile", "cudagraph", "precision")


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
    job = {"log": {"progress": False, "every": 10}, **job, **overrides}
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
    compiled, _ = train(TUTORIAL, accelerate="compile")
    close(compiled, eager, rtol=1e-5)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    # Only the breaks every compiled step has: Dynamo cannot trace backward, torch.optim splits its step.
    assert report == ["compile: 3 graphs, 3 graph breaks (backward 1, torch.optim step boundary 2)"]


def test_compile_matches_eager_with_a_user_loss_a_regularizer_accumulation_and_a_short_batch(capsys):
    eager, _ = train(SMALL, PenalizedCrossEntropy(), L2())
    compiled, result = train(SMALL, PenalizedCrossEntropy(), L2(), accelerate="compile")
    assert len(eager) == 13 * 4
    close(compiled, eager, rtol=1e-5)
    assert "l2" in result.metrics
    out = capsys.readouterr().out
    assert "other" not in out  # the user's loss and the regularizer compile without a break
    # Each accumulation position compiles once (a graph before and after backward), not once per epoch.
    more = re.search(r"compile: (\d+) more graphs", out)
    assert more is not None and int(more.group(1)) <= 4


def test_compile_with_bf16_autocast_matches_eager_bf16():
    eager, _ = train(TUTORIAL, precision="bf16-mixed")
    compiled, _ = train(TUTORIAL, precision="bf16-mixed", accelerate="compile")
    close(compiled, eager, rtol=1e-2)


def test_compile_settings_are_checked():
    with pytest.raises(engine.ConfigError, match=r"compile\.mode"):
        engine.run({**TUTORIAL, "accelerate": "compile", "compile": {"mode": "fastest"}})
    # Dynamo cannot trace backward, so one graph for the whole step is out of reach: said so, by name.
    with pytest.raises(engine.ConfigError, match=r"compile\.fullgraph = true: .*backward"):
        engine.run({**TUTORIAL, "accelerate": "compile", "compile": {"fullgraph": True}})


# --- precision (CPU) -------------------------------------------------------------------------


def test_bf16_mixed_follows_float32_within_bf16_tolerance():
    full, _ = train(TUTORIAL)
    half, _ = train(TUTORIAL, precision="bf16-mixed")
    close(half, full, rtol=2e-2)


def test_fp16_mixed_scales_the_loss_and_trains():
    trainer = engine.setup({**TUTORIAL, "precision": "16-mixed", "log": {"progress": False}})
    result = trainer.fit()
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    assert trainer.scaler.get_scale() < 65536.0  # the first steps overflowed fp16 and were skipped
    full, _ = train(TUTORIAL)
    assert result.metrics["loss"] == pytest.approx(full[-1], rel=0.1)


def test_unknown_precision_is_a_config_error():
    with pytest.raises(engine.ConfigError, match="precision: expected"):
        engine.run({**TUTORIAL, "precision": "8"})


# --- accelerate and auto (CPU) -----------------------------------------------------------------


def test_cudagraph_on_cpu_is_a_one_line_config_error():
    with pytest.raises(engine.ConfigError) as raised:
        engine.run({**TUTORIAL, "device": "cpu", "accelerate": "cudagraph"})
    assert str(raised.value) == "accelerate = 'cudagraph' needs a CUDA device; this run's device is cpu"


def test_unknown_mode_and_blocked_mode_plugin_are_config_errors():
    with pytest.raises(engine.ConfigError, match="accelerate: expected one of eager, compile, cudagraph, auto"):
        engine.run({**TUTORIAL, "accelerate": "fast"})
    with pytest.raises(engine.ConfigError, match="plugin 'compile' is blocked"):
        engine.run({**TUTORIAL, "accelerate": "compile"}, blocked=["compile"])


def test_the_engine_trains_as_before_with_every_acceleration_plugin_blocked():
    eager, _ = train(TUTORIAL)
    recorder = Recorder()
    engine.run({**TUTORIAL, "log": {"progress": False}}, plugins=[recorder], blocked=MINE)
    assert recorder.values() == eager


def test_auto_times_the_candidates_prints_the_choice_and_trains_as_eager(capsys):
    eager, _ = train(TUTORIAL, optimizer={"impl": "foreach"})
    chosen, _ = train(TUTORIAL, optimizer={"impl": "foreach"}, accelerate="auto", auto={"steps": 8})
    close(chosen, eager, rtol=1e-5)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:")]
    assert len(lines) == 1
    assert "eager" in lines[0] and "fused" in lines[0] and " us" in lines[0]
    assert "compile skipped" in lines[0]  # 50 tiny steps can never pay for a compile


def test_auto_with_eager_alone_hands_the_loop_the_plain_step():
    trainer = engine.setup({**TUTORIAL, "accelerate": "auto", "auto": {"steps": 4, "candidates": ["eager"]}})
    trainer.fit()
    assert trainer.step == trainer.train_step  # the loop calls the chosen step directly


# --- CUDA ------------------------------------------------------------------------------------

CUDA_SMALL = {**SMALL, "device": "cuda"}


@cuda
@pytest.mark.cuda
def test_cudagraph_matches_eager_with_a_user_loss_regularizer_schedule_clipping_and_accumulation():
    eager, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2())
    graphed, result = train(CUDA_SMALL, PenalizedCrossEntropy(), L2(), accelerate="cudagraph")
    close(graphed, eager, rtol=1e-4, atol=1e-5)
    assert "l2" in result.metrics


@cuda
@pytest.mark.cuda
def test_cudagraph_follows_the_learning_rate_schedule():
    job = {**CUDA_SMALL, "grad_accumulation": 1, "grad_clip": {"max_norm": 0.0}}
    constant, _ = train({**job, "scheduler": {"name": "none"}}, PenalizedCrossEntropy(), accelerate="cudagraph")
    eager, _ = train(job, PenalizedCrossEntropy())
    graphed, _ = train(job, PenalizedCrossEntropy(), accelerate="cudagraph")
    close(graphed, eager, rtol=1e-4, atol=1e-5)
    assert graphed[-1] != pytest.approx(constant[-1], rel=1e-3)  # the schedule is not frozen into the graph


@cuda
@pytest.mark.cuda
def test_cudagraph_refuses_a_scheduler_that_changes_a_non_tensor_setting():
    job = {**CUDA_SMALL, "grad_accumulation": 1, "scheduler": {"name": "onecycle"}}
    with pytest.raises(engine.TrainingError, match="'betas'"):
        train(job, PenalizedCrossEntropy(), accelerate="cudagraph")


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
        train(job, NaNData(), accelerate=mode)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cudagraph_with_mixed_precision_matches_eager(precision):
    job = {**CUDA_SMALL, "precision": precision}
    eager, _ = train(job, PenalizedCrossEntropy(), L2())
    graphed, _ = train(job, PenalizedCrossEntropy(), L2(), accelerate="cudagraph")
    close(graphed, eager, rtol=1e-2, atol=1e-3)


@cuda
@pytest.mark.cuda
def test_compile_on_cuda_matches_eager():
    eager, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2())
    compiled, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2(), accelerate="compile")
    close(compiled, eager, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.cuda
def test_auto_on_cuda_tries_cudagraph(capsys):
    train({**CUDA_SMALL, "epochs": 40}, PenalizedCrossEntropy(), accelerate="auto", auto={"steps": 8})
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert "cudagraph" in line
