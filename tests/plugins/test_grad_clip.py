"""plugins/grad_clip.py: gradients clipped by total norm before each optimizer step."""

from __future__ import annotations

import torch
from torch import nn

import engine
from tests.helpers import job, tutorial_data


def test_clipping_matches_the_hand_written_loop():
    result = engine.run(job(epochs=3, optimizer={"name": "sgd", "lr": 0.5}, grad_clip={"max_norm": 0.25}))
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
    torch.testing.assert_close(result.model.weight, model.weight)
    torch.testing.assert_close(result.model.bias, model.bias)


def test_each_step_moves_the_parameters_at_most_lr_times_max_norm():
    class Watch:
        def __init__(self) -> None:
            self.moves: list[float] = []
            self.before: torch.Tensor | None = None

        @engine.hookimpl
        def before_forward(self, trainer):
            self.before = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).clone()

        @engine.hookimpl
        def after_step(self, trainer):
            after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            self.moves.append((after - self.before).norm().item())

    watch = Watch()
    engine.run(job(epochs=4, optimizer={"name": "sgd", "lr": 1.0}, grad_clip={"max_norm": 0.01}), plugins=[watch])
    assert len(watch.moves) == 4
    assert all(0.0099 < move <= 0.01 + 1e-6 for move in watch.moves)  # the raw gradient norm is far larger


def test_off_by_default():
    unclipped = engine.run(job(optimizer={"name": "sgd", "lr": 0.5}, run_name="a"))
    zero = engine.run(job(optimizer={"name": "sgd", "lr": 0.5}, grad_clip={"max_norm": 0.0}, run_name="b"))
    assert unclipped.config["grad_clip"]["max_norm"] == 0.0
    assert torch.equal(unclipped.model.weight, zero.model.weight)
