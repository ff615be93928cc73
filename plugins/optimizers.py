"""Built-in optimizers: the `[optimizer]` section picks one by name.

`impl = "auto"` takes torch's fused kernel where the parameters' device has one: on this project's
2-core CPU fused Adam makes the tutorial job 1.26x and the MLP job 1.38x faster than the default
(see bench/RESULTS.md). Otherwise it leaves the choice to torch (foreach where it can).
The learning rate defaults to 0.01, the tutorial's, for every optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

import engine

IMPLS = ("auto", "fused", "foreach", "for_loop")


def implementation(impl: str, params: list[torch.Tensor]) -> dict[str, bool | None]:
    """The fused/foreach keyword arguments for `impl`."""
    if impl not in IMPLS:
        raise engine.ConfigError(f"optimizer.impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        supported = _get_fused_kernels_supported_devices()
        fusable = params and all(p.device.type in supported and p.is_floating_point() for p in params)
        return {"fused": True} if fusable else {}
    if impl == "fused":
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def sgd(
    params: Iterable[torch.Tensor],
    lr: float = 0.01,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    impl: str = "auto",
) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        **implementation(impl, params),
    )


def adam(
    params: Iterable[torch.Tensor],
    lr: float = 0.01,
    betas: tuple = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    impl: str = "auto",
) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.Adam(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        **implementation(impl, params),
    )


def adamw(
    params: Iterable[torch.Tensor],
    lr: float = 0.01,
    betas: tuple = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = False,
    impl: str = "auto",
) -> torch.optim.Optimizer:
    params = list(params)
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        **implementation(impl, params),
    )


@engine.hookimpl
def register_settings():
    return {"optimizer": {"name": "adam"}}


@engine.hookimpl
def register_components():
    return {"optimizer": {"sgd": sgd, "adam": adam, "adamw": adamw}}
