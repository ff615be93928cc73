"""plugins/grad_clip.py: gradients clipped by total norm before each optimizer step."""

from __future__ import annotations

import torch
from torch import nn

import engine
from tests.helpers import job, tutorial_data


def hand_written(epochs: int, max_norm: float | None) -> nn.Linear:
    """The tutorial's loop with SGD at a rate of 0.5, clipping the gradients to `max_norm` if given."""
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(epochs):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if max_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    return model


def test_clipping_matches_the_hand_written_loop():
    result = engine.run(job(epochs=3, optimizer={"name": "sgd", "lr": 0.5}, grad_clip={"max_norm": 0.25}))
    model = hand_written(3, max_norm=0.25)
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
    sgd = {"name": "sgd", "lr": 0.5}
    default = engine.setup(job(optimizer=sgd, run_name="default"))
    assert default.config["grad_clip"]["max_norm"] == 0.0
    assert "grad_clip" in default.off and default.before_optimizer_step == []  # nothing runs per step
    unclipped = default.fit()
    clipped = engine.run(job(optimizer=sgd, grad_clip={"max_norm": 0.25}, run_name="clipped"))
    without = engine.run(job(optimizer=sgd, run_name="without"), blocked=["grad_clip"])
    # The job's gradients are far above 0.25: clipping would have changed the weights...
    assert not torch.allclose(clipped.model.weight, unclipped.model.weight)
    # ... and max_norm = 0 leaves them as a run without the plugin, and the hand-written loop, have them.
    assert torch.equal(unclipped.model.weight, without.model.weight)
    assert torch.equal(unclipped.model.bias, without.model.bias)
    model = hand_written(3, max_norm=None)
    torch.testing.assert_close(unclipped.model.weight, model.weight, rtol=0, atol=0)
    torch.testing.assert_close(unclipped.model.bias, model.bias, rtol=0, atol=0)
