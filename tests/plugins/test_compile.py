"""plugins/compile.py: ``torch.compile`` of the whole step trains as eager does, with a user's loss,
a regularizer, accumulation and a short batch; it reports its graph breaks, refuses
``fullgraph``, and a resumed compiled run continues exactly.

torch.compile is slow to compile on the CPU, so the compiled runs are few and small."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from engine_plugins.compile import summary

import engine
from tests.helpers import read_jsonl
from tests.plugins.accelerated import (
    BF16,
    COMPILE,
    CUDA_SMALL,
    L2,
    SMALL,
    TUTORIAL,
    PenalizedCrossEntropy,
    close,
    cuda,
    resumes_exactly,
    train,
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo reuses a compiled step across runs of one process (its guards are on types and
    shapes): each test starts from an empty cache, so that reports and errors are its own."""
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_matches_eager_on_the_tutorial_job_without_unexpected_graph_breaks(capsys):
    eager, _ = train(TUTORIAL)
    compiled, _ = train(TUTORIAL, accelerate=COMPILE)
    close(compiled, eager, rtol=1e-5)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    # The breaks every compiled step has: Dynamo cannot trace backward, torch.optim splits its
    # step, and the default (fused) optimizer kernel is opaque to it.
    assert report == ["compile: 2 graphs, 5 graph breaks (backward 1, torch.optim step boundary 2, fused optimizer 2)"]


@pytest.mark.slow  # a second compile of the tutorial's step
def test_a_for_loop_optimizer_compiles_without_the_fused_kernels_breaks(capsys):
    eager, _ = train(TUTORIAL)
    compiled, _ = train(TUTORIAL, accelerate=COMPILE, optimizer={"impl": "for_loop"})
    close(compiled, eager, rtol=1e-5)
    report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    assert report == ["compile: 3 graphs, 3 graph breaks (backward 1, torch.optim step boundary 2)"]


@pytest.mark.slow
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


@pytest.mark.slow  # a compile under autocast
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


def test_the_report_names_each_cause_and_counts_the_others():
    breaks = Counter(
        {
            "Unsupported Tensor.backward() call": 1,
            "torch._dynamo.graph_break() called": 2,
            "a fused optimizer kernel": 2,
            "data-dependent branching": 3,
        }
    )
    assert summary(breaks, 4) == (
        "compile: 4 graphs, 8 graph breaks (backward 1, torch.optim step boundary 2, fused optimizer 2, "
        "other 3: set accelerate.explain = true to see them)"
    )
    assert summary(Counter(), 1) == "compile: 1 graphs, 0 graph breaks"


def test_the_compiled_optimizer_takes_its_rate_as_a_tensor_and_keeps_its_state():
    trainer = engine.setup({**SMALL, "accelerate": COMPILE}, plugins=[PenalizedCrossEntropy()])
    group = trainer.optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and type(trainer.optimizer) is torch.optim.AdamW
    assert trainer.optimizer.defaults["foreach"] is not True  # a tensor rate on the CPU: not foreach


@pytest.mark.slow  # two compiles of the small job's step
def test_a_resumed_compiled_run_restores_the_optimizer_state_and_continues_exactly(tmp_path):
    """The setup chain builds the final optimizer (compile's: a tensor rate) before the checkpoint is
    restored into it; the resumed run compiles the same graphs and repeats the steps bit for bit."""
    resumes_exactly({**SMALL, "epochs": 3, "accelerate": COMPILE}, 6, tmp_path / "runs", PenalizedCrossEntropy())


# --- CUDA ------------------------------------------------------------------------------------------


@cuda
@pytest.mark.cuda
def test_compile_on_cuda_matches_eager():
    eager, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2())
    compiled, _ = train(CUDA_SMALL, PenalizedCrossEntropy(), L2(), accelerate=COMPILE)
    close(compiled, eager, rtol=1e-4, atol=1e-5)


@cuda
@pytest.mark.cuda
def test_a_resumed_compiled_run_on_cuda_restores_the_optimizer_state_and_continues_exactly(tmp_path):
    resumes_exactly({**CUDA_SMALL, "epochs": 3, "accelerate": COMPILE}, 6, tmp_path / "runs", PenalizedCrossEntropy())
