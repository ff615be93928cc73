"""Built-in losses: the `[loss]` section picks one by name.

Each loss checks that the model output fits the target before torch sees them, because torch
would silently broadcast MSE on ``[N, 1]`` against ``[N]`` into an ``[N, N]`` loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import engine


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


def _weights(values: tuple[float, ...], device: torch.device) -> Tensor | None:
    return torch.tensor(values, dtype=torch.float32, device=device) if values else None


def mse(reduction: str = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    return _same_shape("mse", nn.MSELoss(reduction=reduction))


def l1(reduction: str = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    return _same_shape("l1", nn.L1Loss(reduction=reduction))


def smooth_l1(reduction: str = "mean", beta: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    return _same_shape("smooth_l1", nn.SmoothL1Loss(reduction=reduction, beta=beta))


def huber(reduction: str = "mean", delta: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    return _same_shape("huber", nn.HuberLoss(reduction=reduction, delta=delta))


def bce_with_logits(
    device: torch.device, reduction: str = "mean", pos_weight: tuple = ()
) -> Callable[[Tensor, Tensor], Tensor]:
    """Binary cross-entropy on raw logits; `pos_weight` has one weight per output column."""
    loss = nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=_weights(pos_weight, device))
    return _same_shape("bce_with_logits", loss)


def cross_entropy(
    info: engine.DataInfo,
    device: torch.device,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: tuple = (),
    ignore_index: int = -100,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy on raw logits (no softmax in the model) against class indices."""
    loss = nn.CrossEntropyLoss(
        weight=_weights(weight, device), reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    return _class_indices("cross_entropy", loss, _classes(info))


def nll(
    info: engine.DataInfo, device: torch.device, reduction: str = "mean", weight: tuple = (), ignore_index: int = -100
) -> Callable[[Tensor, Tensor], Tensor]:
    """Negative log-likelihood: the model must end in log_softmax."""
    loss = nn.NLLLoss(weight=_weights(weight, device), reduction=reduction, ignore_index=ignore_index)
    return _class_indices("nll", loss, _classes(info))


def _classes(info: engine.DataInfo) -> int:
    return info.n_outputs if info.task == "classification" else 0


@engine.hookimpl
def register_settings():
    return {"loss": {"name": "mse"}}


@engine.hookimpl
def register_components():
    return {
        "loss": {
            "mse": mse,
            "cross_entropy": cross_entropy,
            "l1": l1,
            "smooth_l1": smooth_l1,
            "huber": huber,
            "bce_with_logits": bce_with_logits,
            "nll": nll,
        }
    }
