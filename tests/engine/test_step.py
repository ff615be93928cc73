"""engine/step.py: the train step, one function of a batch and its accumulation window that
returns the detached loss and terms; what the window changes (zeroing, scaling, stepping); the
loss terms it sums."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from engine.step import loss_terms, total
from tests.helpers import job


def test_train_step_is_one_function_of_a_batch_and_its_window_returning_detached_losses():
    trainer = engine.setup(job())
    batch = next(trainer.loaders.train(1))
    before = trainer.model.weight.detach().clone()
    with torch.no_grad():
        expected = nn.functional.mse_loss(trainer.model(batch.x), batch.y).item()
    loss, terms = trainer.train_step(batch, engine.Window(first=True, last=True, scale=1.0))
    assert not loss.requires_grad and loss.shape == ()
    assert set(terms) == {"mse"} and terms["mse"] is loss
    assert loss.item() == pytest.approx(expected)  # the loss before the optimizer stepped
    assert not torch.equal(before, trainer.model.weight)


def gradient(weights: list[torch.Tensor], batch: engine.Batch) -> list[torch.Tensor]:
    """The hand-written gradient of the MSE of a Linear(1, 1) with `weights` on `batch`."""
    model = nn.Linear(1, 1)
    model.load_state_dict(dict(zip(["weight", "bias"], weights)))
    nn.functional.mse_loss(model(batch.x), batch.y).backward()
    return [model.weight.grad, model.bias.grad]


def test_the_window_zeroes_on_its_first_batch_scales_the_loss_and_steps_on_its_last():
    trainer = engine.setup(job(optimizer={"name": "sgd", "lr": 0.1}, data={"batch_size": 50}))
    first, second = list(trainer.loaders.train(1))
    params = list(trainer.module.parameters())
    weights = [p.detach().clone() for p in params]

    trainer.train_step(first, engine.Window(first=True, last=False, scale=0.5))
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # no step inside a window
    for p, expected in zip(params, gradient(weights, first)):
        torch.testing.assert_close(p.grad, 0.5 * expected)
    trainer.train_step(second, engine.Window(first=False, last=True, scale=0.5))
    mean = [0.5 * (a + b) for a, b in zip(gradient(weights, first), gradient(weights, second))]
    for p, w, g in zip(params, weights, mean):
        torch.testing.assert_close(p.grad, g)  # the window's gradients add up
        torch.testing.assert_close(p.detach(), w - 0.1 * g)  # one SGD step on their mean
    stepped = [p.detach().clone() for p in params]
    trainer.train_step(first, engine.Window(first=True, last=False, scale=1.0))
    for p, expected in zip(params, gradient(stepped, first)):
        torch.testing.assert_close(p.grad, expected)  # a window's first batch starts from zero


class Extra:
    @engine.hookimpl
    def compute_loss(self, output):
        return {"extra": output.abs().mean()}


def test_the_step_returns_every_loss_term_and_optimizes_their_sum():
    trainer = engine.setup(job(), plugins=[Extra])
    batch = next(trainer.loaders.train(1))
    with torch.no_grad():
        output = trainer.model(batch.x)
        mse, extra = nn.functional.mse_loss(output, batch.y).item(), output.abs().mean().item()
    loss, terms = trainer.train_step(batch, engine.Window(True, True, 1.0))
    assert set(terms) == {"mse", "extra"} and not any(term.requires_grad for term in terms.values())
    assert terms["mse"].item() == pytest.approx(mse) and terms["extra"].item() == pytest.approx(extra)
    assert loss.item() == pytest.approx(mse + extra)


def test_total_adds_the_terms_in_order():
    one = torch.tensor(1.5)
    assert total({"a": one}) is one  # no extra op for a single term
    assert total({"a": one, "b": torch.tensor(2.0), "c": torch.tensor(-0.5)}).item() == 3.0


def test_two_loss_terms_of_one_name_inside_the_step_are_a_training_error():
    trainer = engine.setup(job())
    trainer.compute_loss = [lambda batch, output: {"x": output.sum()}, lambda batch, output: {"x": output.mean()}]
    batch = next(trainer.loaders.train(1))
    with pytest.raises(engine.TrainingError, match=r"hook compute_loss: two loss terms are named 'x'"):
        output = trainer.model(batch.x)
        loss_terms(trainer, batch, output, output)
