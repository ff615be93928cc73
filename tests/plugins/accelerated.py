"""What the tests of the acceleration plugins (accelerate, compile, cudagraph, precision) share:
eager as the oracle, a user's loss and a regularizer plugin, the jobs, and an exact resume.

Eager is the oracle: every step's loss on a fixed seed, compared step by step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import engine
from tests.helpers import rewind

COMPILE = {"name": "compile"}
GRAPHS = {"name": "cudagraph"}
BF16 = {"name": "bf16-mixed"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TUTORIAL = {"epochs": 50, "run_name": "tutorial"}
# A small classification MLP: 3 full batches and a short one (8 samples) per epoch, accumulation
# windows of 2, clipping and a per-step schedule: every path of the step.
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
CUDA_SMALL = {**SMALL, "device": "cuda"}


class Losses:
    """Keeps every step's loss (on the device, as the metrics plugin does) and reads them at the end."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    @engine.hookimpl
    def after_step(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def values(self) -> list[float]:
        return torch.stack(self.losses).tolist()


class PenalizedCrossEntropy:
    """A user's loss component: cross-entropy plus a penalty on large logits."""

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
    def compute_loss(self, trainer: engine.TrainerView) -> dict[str, torch.Tensor]:
        return {"l2": 1e-3 * sum(p.pow(2).sum() for p in trainer.model.parameters())}


def train(job: dict[str, Any], *extra: Any, **overrides: Any) -> tuple[list[float], engine.Result]:
    """Every step's loss of the job, and its result; `overrides` replace sections of the job."""
    losses = Losses()
    job = {"log": {"progress": False, "every": 10}, **job, **overrides, "run_name": ""}  # a fresh directory each
    result = engine.run(job, plugins=[losses, *extra])
    return losses.values(), result


def close(actual: list[float], expected: list[float], rtol: float, atol: float = 1e-6) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert math.isclose(a, e, rel_tol=rtol, abs_tol=atol), f"step {step}: {a} != {e}"


class OptimizerAt:
    """The optimizer's state (a deep copy) after step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: dict[str, Any] | None = None

    @engine.hookimpl
    def after_step(self, state: engine.State, trainer: engine.TrainerView) -> None:
        if state.step == self.step:
            self.saved = copy.deepcopy(trainer.optimizer.state_dict())


def equal_states(actual: Any, expected: Any, where: str = "optimizer") -> None:
    """Every tensor and value of two state dicts equal, bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            equal_states(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            equal_states(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def resumes_exactly(job: dict[str, Any], at: int, runs_dir: Path, *extra: Any) -> None:
    """A run of `job` rewound to its checkpoint of step `at` and resumed through `engine.setup(resume=...)`
    restores the optimizer state the uninterrupted run had there, value for value, and goes on to
    the same losses and weights, bit for bit."""
    job = {**job, "checkpoint": {"every_steps": at, "keep_last": 100}, "log": {"progress": False}}
    losses, optimizer_at = Losses(), OptimizerAt(at)
    whole = engine.run({**job, "run_name": "whole", "runs_dir": str(runs_dir)}, plugins=[losses, optimizer_at, *extra])
    assert optimizer_at.saved is not None and len(optimizer_at.saved["state"]) == 4  # moments for every tensor

    resumed_dir = rewind(whole.run_dir, at, runs_dir / "resumed")
    after = Losses()
    trainer = engine.setup(resume=resumed_dir, plugins=[*extra, after], trust=True)  # its job may name our loss
    assert trainer.resumed_from.name == f"step-{at:09d}.pt" and trainer.state.step == at
    equal_states(trainer.optimizer.state_dict(), optimizer_at.saved)
    resumed = trainer.fit()
    assert after.values() == losses.values()[at:]
    for name, weight in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
