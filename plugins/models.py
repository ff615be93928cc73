"""Built-in models: `linear` and `mlp`, sized from the data unless the config says otherwise.

Any other `nn.Module` comes in by reference: ``[model] name = "package.module:factory"``; the
factory's keyword parameters become the section's settings.
"""

from __future__ import annotations

from torch import nn

import engine

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def _sizes(info: engine.DataInfo, in_features: int, out_features: int) -> tuple[int, int]:
    return in_features or info.n_features, out_features or info.n_outputs


def linear(info: engine.DataInfo, in_features: int = 0, out_features: int = 0, bias: bool = True) -> nn.Module:
    """``nn.Linear``; 0 means inferred (features of the data; target width or class count)."""
    return nn.Linear(*_sizes(info, in_features, out_features), bias=bias)


def mlp(
    info: engine.DataInfo,
    hidden: tuple = (64, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    layer_norm: bool = False,
    in_features: int = 0,
    out_features: int = 0,
) -> nn.Module:
    """Linear layers of sizes `hidden`, each followed by [LayerNorm], the activation and [Dropout]."""
    if activation not in ACTIVATIONS:
        raise engine.ConfigError(
            f"model.activation: unknown activation {activation!r} (one of: {', '.join(ACTIVATIONS)})"
        )
    if not 0 <= dropout < 1:
        raise engine.ConfigError(f"model.dropout: must be in [0, 1), got {dropout}")
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
def register_settings():
    return {"model": {"name": "linear"}}


@engine.hookimpl
def register_components():
    return {"model": {"linear": linear, "mlp": mlp}}
