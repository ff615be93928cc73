"""Built-in convolutional network: `cnn`, for images (samples of C x H x W, or H x W for one
channel), sized from the data.

Stages of convolutions (``channels``: one stage each, ``convs`` convolutions of ``kernel`` x
``kernel`` that keep the image's size), each with [BatchNorm] and the activation, then a 2 x 2
pooling that halves it; then the head: the feature maps flattened (or averaged over the image),
[Dropout] and linear layers of sizes ``hidden`` to the classes (or target values).
"""

from __future__ import annotations

from typing import Annotated, Literal

from torch import nn

import engine

Positive = Annotated[int, engine.Range(ge=1)]
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def cnn(
    info: engine.DataInfo,
    channels: tuple[Positive, ...] = (32, 64),
    kernel: Positive = 3,
    convs: Positive = 1,
    pool: Literal["max", "avg", "none"] = "max",
    batch_norm: bool = True,
    activation: Activation = "relu",
    head: Literal["flatten", "average"] = "flatten",
    hidden: tuple[Positive, ...] = (128,),
    dropout: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0,
    out_features: Annotated[int, engine.Range(ge=0)] = 0,
) -> nn.Module:
    """A convolutional network for the data's images (``info.input_shape``: C x H x W, or H x W,
    given one channel); `out_features` 0: the data's classes or target width."""
    if kernel % 2 == 0:
        raise engine.ConfigError(f"model.kernel: an odd size (3, 5, 7) keeps the image's size, got {kernel}")
    depth, height, width = image_shape(info)
    layers: list[nn.Module] = [] if len(info.input_shape) == 3 else [nn.Unflatten(1, (1, height))]
    for stage, size in enumerate(channels):
        for _ in range(convs):
            layers.append(nn.Conv2d(depth, size, kernel, padding=kernel // 2, bias=not batch_norm))
            layers += [nn.BatchNorm2d(size)] if batch_norm else []
            layers.append(ACTIVATIONS[activation]())
            depth = size
        if pool != "none":
            if min(height, width) < 2:
                raise engine.ConfigError(
                    f"model.channels: stage {stage + 1} of {len(channels)} pools {height}x{width} feature maps "
                    'to nothing; fewer stages, or pool = "none"'
                )
            layers.append(POOLS[pool](2))
            height, width = height // 2, width // 2
    if head == "average":
        layers.append(nn.AdaptiveAvgPool2d(1))
        height = width = 1
    layers.append(nn.Flatten())
    features = depth * height * width
    for size in hidden:
        layers += [nn.Dropout(dropout)] if dropout else []
        layers += [nn.Linear(features, size), ACTIVATIONS[activation]()]
        features = size
    layers += [nn.Dropout(dropout)] if dropout else []
    layers.append(nn.Linear(features, out_features or info.n_outputs))
    return nn.Sequential(*layers)


def image_shape(info: engine.DataInfo) -> tuple[int, int, int]:
    """(C, H, W) of the data's images; a ConfigError naming the model when its samples are not images."""
    shape = tuple(info.input_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise engine.ConfigError(
            f"model 'cnn': the data's samples have shape {shape or (info.n_features,)}, not images (C, H, W or "
            'H, W): data.name = "images" reads arrays of images (data.shape = [1, 8, 8] for rows of 64 pixels)'
        )
    return shape


@engine.hookimpl
def register_components():
    return {"model": {"cnn": cnn}}
