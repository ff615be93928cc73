"""Built-in losses: the `[loss]` section picks one by name.

Each loss checks that the model output fits the target before torch sees them, because torch
would silently broadcast MSE on ``[N, 1]`` against ``[N]`` into an ``[N, N]`` loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

import engine

# "none" is not offered: the step needs one loss value to optimize.
Reduction = Literal["mean", "sum"]
NonNegative = Annotated[float, engine.Range(ge=0)]


def _same_shape(name: str, loss: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def compute(output: Tensor, target: Tensor) -> Tensor:
        if output.shape != target.shape:
            raise engine.TrainingError(
                f"loss {name!r}: model output shape {tuple(output.shape)} does not match target shape "
                f"{tuple(target.shape)} (it would broadcast); {_hint(output, target)}"
            )
        return loss(output, target)

    return compute


def _hint(output: Tensor, target: Tensor) -> str:
    if not target.is_floating_point():
        return "the targets are class indices: use loss cross_entropy (or nll)"
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        return "the target needs a trailing dimension of 1, or squeeze the output"
    if target.dim() == output.dim() + 1 and target.shape[-1] == 1:
        return "the output lost its trailing dimension of 1 (squeezed?): keep it, or reshape the target"
    return f"give the model {target.shape[-1] if target.dim() > 1 else 'a flat'} output, or reshape the target"


def _class_indices(name: str, loss: nn.Module, n_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    def compute(output: Tensor, target: Tensor) -> Tensor:
        if output.dim() < 2 or target.shape != output.shape[:1] + output.shape[2:]:
            raise engine.TrainingError(
                f"loss {name!r}: expects logits [N, C] and class indices [N]; got output "
                f"{tuple(output.shape)} and target {tuple(target.shape)}"
            )
        if output.shape[1] < n_classes:
            raise engine.TrainingError(
                f"loss {name!r}: the targets hold class indices up to {n_classes - 1}, "
                f"but the model outputs only {output.shape[1]} classes"
            )
        return loss(output, target)

    return compute


def _per_position(name: str, loss: nn.Module, n_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """A loss on class indices for a sequence task: logits [N, T, C] as models emit them, a class
    index per position [N, T], taken as N x T samples (a view: no transpose, no copy)."""

    def compute(output: Tensor, target: Tensor) -> Tensor:
        if output.dim() < 2 or target.shape != output.shape[:-1]:
            raise engine.TrainingError(
                f"loss {name!r}: expects logits [N, T, C] and class indices [N, T] (a sequence task); got output "
                f"{tuple(output.shape)} and target {tuple(target.shape)}"
            )
        if output.shape[-1] < n_classes:
            raise engine.TrainingError(
                f"loss {name!r}: the targets hold class indices up to {n_classes - 1}, "
                f"but the model outputs only {output.shape[-1]} classes"
            )
        return loss(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    return compute


def _weights(values: tuple[float, ...], device: torch.device, key: str, expected: int, what: str) -> Tensor | None:
    """The weights as a tensor (None when not given); a wrong count is a config error naming `key`."""
    if not values:
        return None
    if len(values) != expected:
        raise engine.ConfigError(f"{key}: {len(values)} weights given, but the data has {expected} {what}")
    return torch.tensor(values, dtype=torch.float32, device=device)


def _values(name: str, info: engine.DataInfo) -> None:
    """A loss that compares outputs with values refuses class indices, at setup."""
    if info.task in ("classification", "sequence"):
        binary = ' For 0/1 labels: data.task = "binary".' if name == "bce_with_logits" else ""
        raise engine.ConfigError(
            f"loss.name: {name!r} compares outputs with values, but the targets were read as class indices "
            f"({info.n_outputs} classes): use loss cross_entropy (or nll), or if they are values, set "
            f'data.task = "regression".{binary}'
        )


def mse(info: engine.DataInfo, reduction: Reduction = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    _values("mse", info)
    return _same_shape("mse", nn.MSELoss(reduction=reduction))


def l1(info: engine.DataInfo, reduction: Reduction = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    _values("l1", info)
    return _same_shape("l1", nn.L1Loss(reduction=reduction))


def smooth_l1(
    info: engine.DataInfo, reduction: Reduction = "mean", beta: NonNegative = 1.0
) -> Callable[[Tensor, Tensor], Tensor]:
    _values("smooth_l1", info)
    return _same_shape("smooth_l1", nn.SmoothL1Loss(reduction=reduction, beta=beta))


def huber(
    info: engine.DataInfo, reduction: Reduction = "mean", delta: Annotated[float, engine.Range(gt=0)] = 1.0
) -> Callable[[Tensor, Tensor], Tensor]:
    _values("huber", info)
    return _same_shape("huber", nn.HuberLoss(reduction=reduction, delta=delta))


def bce_with_logits(
    info: engine.DataInfo, device: torch.device, reduction: Reduction = "mean", pos_weight: tuple[NonNegative, ...] = ()
) -> Callable[[Tensor, Tensor], Tensor]:
    """Binary cross-entropy on raw logits; `pos_weight` has one weight per output column."""
    _values("bce_with_logits", info)
    weights = _weights(pos_weight, device, "loss.pos_weight", info.n_outputs, "target columns")
    loss = nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=weights)
    return _same_shape("bce_with_logits", loss)


def cross_entropy(
    info: engine.DataInfo,
    device: torch.device,
    reduction: Reduction = "mean",
    label_smoothing: Annotated[float, engine.Range(ge=0, le=1)] = 0.0,
    weight: tuple[NonNegative, ...] = (),
    ignore_index: int = -100,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy on raw logits (no softmax in the model) against class indices: [N, C] logits
    for [N] targets, or for a sequence task [N, T, C] logits for [N, T] targets; targets equal to
    `ignore_index` (padding) count for nothing."""
    classes = _classes("cross_entropy", info)
    weights = _weights(weight, device, "loss.weight", classes, "classes")
    loss = nn.CrossEntropyLoss(
        weight=weights, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    return (_per_position if info.task == "sequence" else _class_indices)("cross_entropy", loss, classes)


def nll(
    info: engine.DataInfo,
    device: torch.device,
    reduction: Reduction = "mean",
    weight: tuple[NonNegative, ...] = (),
    ignore_index: int = -100,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Negative log-likelihood: the model must end in log_softmax."""
    classes = _classes("nll", info)
    weights = _weights(weight, device, "loss.weight", classes, "classes")
    loss = nn.NLLLoss(weight=weights, reduction=reduction, ignore_index=ignore_index)
    return (_per_position if info.task == "sequence" else _class_indices)("nll", loss, classes)


def _classes(name: str, info: engine.DataInfo) -> int:
    """The number of classes; a loss on class indices refuses other targets, at setup."""
    if info.task == "binary":
        raise engine.ConfigError(
            f'loss.name: {name!r} takes class indices, but data.task = "binary" gives 0/1 labels with one output: '
            'use loss bce_with_logits, or data.task = "classification" for two classes'
        )
    if info.task == "regression":
        raise engine.ConfigError(
            f"loss.name: {name!r} takes class indices, but the targets were read as values "
            f'(data.task = "regression"): use a loss on values (mse, l1, huber), or if they are classes, set '
            'data.task = "classification"'
        )
    return info.n_outputs if info.task in ("classification", "sequence") else 0


def model(output: str = "loss") -> engine.ModelLoss:
    """The loss the model computes itself, from the targets it is given (``[model] targets``):
    `output` picks it out of what the model returns, as ``model.output`` picks the logits (an
    index, ``"1"`` of nanoGPT's ``(logits, loss)``, or a key or attribute, ``"loss"``)."""
    return engine.ModelLoss(output)


@engine.hookimpl
def register_components():
    return {
        "default": {"loss": "mse"},
        "loss": {
            "mse": mse,
            "cross_entropy": cross_entropy,
            "l1": l1,
            "smooth_l1": smooth_l1,
            "huber": huber,
            "bce_with_logits": bce_with_logits,
            "nll": nll,
            "model": model,
        },
    }
