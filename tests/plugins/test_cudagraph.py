"""plugins/cudagraph.py: the whole step captured in CUDA graphs trains as eager does (with a user's
loss, a regularizer, a schedule, clipping, accumulation and mixed precision), refuses what a graph
cannot follow, and a resumed run continues exactly. Off CUDA: a one-line config error, and no
candidate of ``auto``; the CUDA tests skip cleanly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_plugins.cudagraph import Frozen, Graphed, graph_safe

import engine
from tests.plugins.accelerated import (
    COMPILE,
    CUDA_SMALL,
    GRAPHS,
    L2,
    TUTORIAL,
    PenalizedCrossEntropy,
    close,
    cuda,
    resumes_exactly,
    train,
)


def test_cudagraph_on_cpu_is_a_one_line_config_error():
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup({**TUTORIAL, "device": "cpu", "accelerate": GRAPHS})
    assert str(raised.value) == "accelerate.name = 'cudagraph': it needs a CUDA device; this run's device is cpu"


def test_off_cuda_cudagraph_is_no_candidate_of_auto():
    trainer = engine.setup({**TUTORIAL, "device": "cpu", "accelerate": {"name": "auto"}})
    assert "cudagraph" not in trainer.acceleration.others and "compile" in trainer.acceleration.others


def test_several_processes_are_refused_naming_why():
    def trainer(world_size: int, sharded: bool = False) -> SimpleNamespace:
        processes = SimpleNamespace(sharded=sharded)
        return SimpleNamespace(device=torch.device("cuda"), world_size=world_size, distributed=processes)

    assert Graphed(trainer(2), 3).unavailable() == (
        "it runs in a single process, not 2: DDP's gradient all-reduce is not captured; use 'compile' or 'eager'"
    )
    assert Graphed(trainer(2, sharded=True), 3).unavailable().startswith("FSDP2's all-gathers and reduce-scatters")
    assert Graphed(trainer(1), 3).unavailable() is None


def test_a_setting_a_scheduler_changes_after_capture_is_named():
    weights = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.Adam([{"params": weights, "lr": 0.1}])
    frozen = Frozen(optimizer)
    optimizer.param_groups[0]["lr"] = 0.05  # a float rate is baked into the graph too
    with pytest.raises(engine.TrainingError, match=r"optimizer setting 'lr' of param group 0 changed from 0.1 to 0.05"):
        frozen.check()
    safe = graph_safe(torch.optim.Adam(weights, lr=0.1))
    assert isinstance(safe.param_groups[0]["lr"], torch.Tensor) and safe.defaults["capturable"]
    frozen = Frozen(safe)
    safe.param_groups[0]["lr"].fill_(0.05)  # a tensor rate, as schedulers write it: the graph follows
    frozen.check()
    safe.param_groups[0]["betas"] = (0.8, 0.999)  # OneCycle's momentum
    with pytest.raises(engine.TrainingError, match=r"'betas' of param group 0 changed from \(0.9, 0.999\)"):
        frozen.check()
    assert graph_safe(torch.optim.SGD(weights, lr=0.1)).defaults["fused"]  # SGD has no capturable flag


# --- CUDA ------------------------------------------------------------------------------------------


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
@pytest.mark.parametrize("accelerate", [GRAPHS, COMPILE])
def test_a_nan_loss_is_reported_at_its_step(accelerate):
    job = {"epochs": 3, "device": "cuda", "data": {"name": "with_nan", "batch_size": 10, "shuffle": False}}
    with pytest.raises(engine.TrainingError, match="epoch 1, step 6"):
        train(job, NaNData(), accelerate=accelerate)


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
def test_a_resumed_graphed_run_restores_the_optimizer_state_and_continues_exactly(tmp_path):
    resumes_exactly({**CUDA_SMALL, "epochs": 3, "accelerate": GRAPHS}, 6, tmp_path / "runs", PenalizedCrossEntropy())


@cuda
@pytest.mark.cuda
def test_auto_on_cuda_tries_cudagraph(capsys):
    train({**CUDA_SMALL, "epochs": 40}, PenalizedCrossEntropy(), accelerate={"name": "auto", "steps": 10})
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate auto:"))
    assert "cudagraph " in line
