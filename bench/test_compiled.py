"""compiled: the train step eager, fused, under torch.compile, as a CUDA graph, and chosen by `auto`.

Contenders, for the tutorial job, the MLP job and a wider model where fusion matters (128 -> 512
-> 512 -> 10 with LayerNorm and GELU, batch 256), on the CPU and on CUDA:

- hand-written: the tutorial's loop with torch's default Adam (the group's baseline);
- engine eager: ``[accelerate] name = "eager"`` with torch's default Adam, the baseline's work;
- engine fused: eager with the fused Adam kernel (the engine's default ``optimizer.impl``);
- engine compile, and compile with ``mode = "reduce-overhead"`` (CUDA graphs inside Inductor);
- engine cudagraph: the whole step captured in one CUDA graph (CUDA only);
- engine auto: what ``[accelerate] name = "auto"`` settles on after its trial steps (the warm-up rounds);
- engine bf16-mixed and engine 16-mixed: the eager step under autocast (fp16 with its gradient
  scaler; CUDA only: the CPU's autocast kernels are not what these precisions are for);
- hand-written CUDA graph: the same step captured by hand, the floor for the GPU rows (CUDA only).

Compiling costs seconds per contender, so under ``--benchmark-disable`` (the CI smoke run) the
compile contenders are skipped; tests/test_accelerate.py checks that they train correctly.
GPU figures: ``pytest bench/test_compiled.py -m cuda``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import JOBS, Contenders, Group, Job, torch_default_impl
from engine_plugins import datasets
from torch import nn


def _wide() -> nn.Module:
    layers: list[nn.Module] = []
    for width in (128, 512):
        layers += [nn.Linear(width, 512), nn.LayerNorm(512), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


WIDE = Job(
    name="wide",
    config={
        "seed": 42,
        "data": {"name": "classification", "n_samples": 8192, "n_features": 128, "n_classes": 10, "batch_size": 256},
        "model": {"name": "mlp", "hidden": [512, 512], "activation": "gelu", "layer_norm": True},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "adam", "lr": 1e-3},
    },
    data=lambda: datasets.classification(seed=42, n_samples=8192, n_features=128, n_classes=10),
    model=_wide,
    loss=nn.CrossEntropyLoss,
    batch_size=256,
    epochs_per_round=1,  # 32 steps
    rounds=15,
    warmup_rounds=3,  # enough steps for auto's trials and the CUDA graph's warm-up and capture
)
COMPILED_JOBS = {**JOBS, "wide": WIDE}

# contender -> the engine's overrides; "{impl}" is torch's default optimizer implementation.
ENGINE = {
    "engine eager": ["accelerate.name=eager", "optimizer.impl={impl}"],
    "engine fused": ["accelerate.name=eager", "optimizer.impl=fused"],
    "engine compile": ["accelerate.name=compile"],
    "engine compile reduce-overhead": ["accelerate.name=compile", "accelerate.mode=reduce-overhead"],
    "engine cudagraph": ["accelerate.name=cudagraph"],
    "engine auto": ["accelerate.name=auto"],
    "engine bf16-mixed": ["accelerate.name=eager", "precision.name=bf16-mixed"],
    "engine 16-mixed": ["accelerate.name=eager", "precision.name=16-mixed"],
}
CUDA_ONLY = ("engine cudagraph", "engine bf16-mixed", "engine 16-mixed")
COMPILING = ("engine compile", "engine compile reduce-overhead")


@pytest.fixture(params=list(COMPILED_JOBS))
def job(request: pytest.FixtureRequest) -> Job:
    """The two shared jobs and the wide one, for this group only."""
    return COMPILED_JOBS[request.param]


def test_hand_written(contenders: Contenders, compiled: Group) -> None:
    _, run_round = contenders.hand_written()
    compiled.measure(run_round, "hand-written", baseline=True)


@pytest.mark.parametrize("contender", list(ENGINE))
def test_engine(contenders: Contenders, compiled: Group, contender: str) -> None:
    if contender in CUDA_ONLY and not contenders.device.startswith("cuda"):
        pytest.skip("a CUDA row")
    if contender in COMPILING and compiled.benchmark.disabled:
        pytest.skip("compiling costs seconds per contender: timed runs only")
    impl = torch_default_impl(contenders.device)
    _, run_round = contenders.engine([override.format(impl=impl) for override in ENGINE[contender]])
    compiled.measure(run_round, contender)


def test_hand_written_cuda_graph(contenders: Contenders, compiled: Group) -> None:
    """The floor: the step captured by hand as in PyTorch's whole-network example."""
    if not contenders.device.startswith("cuda"):
        pytest.skip("CUDA graphs need a CUDA device")
    job, device = contenders.job, contenders.device
    model, loss_fn = contenders.model(), job.loss()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(job.lr, device=device), capturable=True, fused=True
    )
    batches = contenders.batches()
    if len(batches.x) % batches.size:
        raise ValueError(f"job {job.name}: the hand-written graph loop has no graph for a short last batch")
    static_x, static_y = (tensor.clone() for tensor in next(iter(batches)))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # backward allocates the graph's gradients from its pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    epochs = job.epochs_per_round

    def run_round() -> None:
        for _ in range(epochs):
            for x, y in batches:
                static_x.copy_(x)
                static_y.copy_(y)
                graph.replay()

    compiled.measure(run_round, "hand-written CUDA graph")
