"""optimizer: ``optimizer.step()`` alone on each job's parameters, with gradients already in place.

torch's default implementation (a per-parameter loop on the CPU, foreach on CUDA) is the baseline;
foreach and fused are the alternatives the engine's ``optimizer.impl`` offers. The engine's
``impl = "auto"`` picks fused wherever the parameters' device has the kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Contenders, Group

STEPS = 100  # optimizer steps per round

IMPLS = {
    "torch default": {},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_optimizer_step(contenders: Contenders, optimizer_group: Group, impl: str) -> None:
    model = contenders.model()
    optimizer = contenders.optimizer(model, **IMPLS[impl])
    generator = torch.Generator().manual_seed(contenders.job.seed)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(parameter.device) * 1e-3

    def run_round() -> None:
        for _ in range(STEPS):
            optimizer.step()

    optimizer_group.measure(run_round, impl, baseline=impl == "torch default", steps_per_round=STEPS)
