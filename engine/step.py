"""The train step: before_forward, forward, the loss terms, zero grad, backward, optimizer step.

Tensor work only, so that an acceleration can compile or capture it whole; a function of the
batch and its accumulation window, returning the detached total loss and terms on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .calling import plain
from .errors import TrainingError
from .steps import Window
from .types import Batch, Step, TrainerView

Forward = Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor] | None]]


def total(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the loss terms (no extra op for a single term)."""
    values = iter(terms.values())
    loss = next(values)
    for value in values:
        loss = loss + value
    return loss


def loss_terms(trainer: Any, batch: Batch, output: torch.Tensor, returned: Any) -> dict[str, torch.Tensor]:
    """The `[loss]` component's term (of the `output`; an `engine.ModelLoss`'s, of what the model
    `returned`) plus every term `compute_loss` returns."""
    main = trainer.loss_fn(returned) if trainer.model_loss else trainer.loss_fn(output, batch.y)
    terms = {trainer.loss_name: main}
    for hook in trainer.compute_loss:
        extra = hook(batch=batch, output=output)
        if extra:
            for name in extra:
                if name in terms:
                    raise TrainingError(f"hook compute_loss: two loss terms are named {name!r}")
            terms.update(extra)
    return terms


def batch_metrics(trainer: Any, batch: Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `compute_metrics` returns for one batch (in a train step or in validation)."""
    values: dict[str, torch.Tensor] = {}
    for hook in trainer.compute_metrics:
        values.update(hook(batch=batch, output=output) or {})
    return values


def forward_of(trainer: Any) -> Forward:
    """The forward pass and its loss: with the loss terms and training metrics the run has, or,
    when it has none but the `[loss]` component's, the loss alone (no dict of terms to build and
    sum: 1.5 us of the tutorial's 70, bench loop-overhead:tutorial:cpu). The model is called as
    its settings say (engine/calling.py): ``model(x)`` for the tutorial's."""
    model, loss_fn, call = trainer.model, trainer.loss_fn, trainer.call
    train_metrics = trainer.config["log"]["train_metrics"] and bool(trainer.compute_metrics)
    if not trainer.compute_loss and not train_metrics and call is plain and not trainer.model_loss:
        return lambda batch: (loss_fn(model(batch.x), batch.y), None)

    def forward(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        output, returned = call(model, batch)
        terms = loss_terms(trainer, batch, output, returned)
        loss = total(terms)
        if train_metrics:
            with torch.no_grad():
                terms.update({f"train_{name}": value for name, value in batch_metrics(trainer, batch, output).items()})
        return loss, terms

    return forward


def build_step(trainer: TrainerView | Any) -> Step:
    """The train step of this run, assembled once from the pieces it has (so no step tests for a
    feature that is off)."""
    forward, before_forward = forward_of(trainer), trainer.before_forward
    before_optimizer_step = list(trainer.before_optimizer_step)
    precision, optimizer, single = trainer.precision, trainer.optimizer, trainer.loss_name
    scaler, autocast = precision.scaler, precision.autocast if precision.dtype is not None else None
    if scaler is not None and before_optimizer_step:
        # The hooks (gradient clipping) see true gradients; scaler.step then skips its unscale.
        before_optimizer_step.insert(0, lambda: scaler.unscale_(optimizer))
    # optimizer.zero_grad() is hidden from Dynamo (torch._disable_dynamo); setting .grad to None
    # is what it does.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # torch's LR schedulers wrap `optimizer.step` to warn when a schedule steps before the optimizer
    # (pytorch#20124); Dynamo does not trace that wrapper (a graph break every compiled step). The
    # core steps them in the right order by construction, so the step calls the optimizer's own.
    optimizer_step = trainer.optimizer_step

    def step(batch: Batch, window: Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for hook in before_forward:
            batch = hook(batch=batch) or batch
        if autocast is None:
            loss, terms = forward(batch)
        else:
            with autocast():
                loss, terms = forward(batch)
        if window.first:
            for param in params:
                param.grad = None
        scaled = loss if window.scale == 1 else loss * window.scale
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        if window.last:
            for hook in before_optimizer_step:
                hook()
            if scaler is None:
                optimizer_step()
            else:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
        detached = loss.detach()
        if terms is None:
            return detached, {single: detached}
        return detached, {name: term.detach() for name, term in terms.items()}

    return step
