"""Built-in models: `linear` and `mlp`, sized from the data unless the config says otherwise.

Any other `nn.Module` comes in by reference: ``[model] name = "package.module:factory"``; the
factory's keyword parameters become the section's settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from torch import nn

import engine

Width = Annotated[int, engine.Range(ge=0)]  # 0: inferred from the data

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]


def _sizes(info: engine.DataInfo, in_features: int, out_features: int) -> tuple[int, int]:
    return in_features or info.n_features, out_features or info.n_outputs


def linear(info: engine.DataInfo, in_features: Width = 0, out_features: Width = 0, bias: bool = True) -> nn.Module:
    """``nn.Linear``; 0 means inferred (features of the data; target width or class count)."""
    return nn.Linear(*_sizes(info, in_features, out_features), bias=bias)


def mlp(
    info: engine.DataInfo,
    hidden: tuple[Annotated[int, engine.Range(ge=1)], ...] = (64, 64),
    activation: Activation = "relu",
    dropout: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0,
    layer_norm: bool = False,
    in_features: Width = 0,
    out_features: Width = 0,
) -> nn.Module:
    """Linear layers of sizes `hidden`, each followed by [LayerNorm], the activation and [Dropout]."""
    width, out = _sizes(info, in_features, out_features)
    layers: list[nn.Module] = []
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


@engine.hookimpl
def register_components():
    return {"default": {"model": "linear"}, "model": {"linear": linear, "mlp": mlp}}
