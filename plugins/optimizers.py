"""Built-in optimizers: the `[optimizer]` section picks one by name.

`impl = "auto"` takes torch's fused kernel where the parameters' device has one: on this project's
2-core CPU fused Adam makes the tutorial job 1.26x and the MLP job 1.38x faster than the default
(see bench/RESULTS.md). Otherwise it leaves the choice to torch (foreach where it can).
The learning rate defaults to 0.01, the tutorial's, for every optimizer.

``decay = "matrices"`` applies ``weight_decay`` to the parameters of two or more dimensions alone
(the weights of linear layers and embeddings), not to biases and normalization weights, as
nanoGPT and most transformer recipes do: two parameter groups. ``"all"`` (the default) decays
every parameter. A factory of a plugin's own builds other groups from ``named_params`` (the
model's ``(name, parameter)`` pairs, the context beside ``params``) and returns an optimizer over
them; each group keeps its settings through `engine.rebuild_optimizer`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

import engine

Impl = Literal["auto", "fused", "foreach", "for_loop"]
Decay = Literal["all", "matrices"]
LearningRate = Annotated[float, engine.Range(gt=0)]
NonNegative = Annotated[float, engine.Range(ge=0)]
Beta = Annotated[float, engine.Range(ge=0, lt=1)]


def implementation(impl: Impl, params: list[torch.Tensor], fuses_shards: bool = True) -> dict[str, bool | None]:
    """The fused/foreach keyword arguments for `impl`; `fuses_shards`: whether torch's fused kernel
    takes sharded parameters (FSDP2's DTensors: Adam's and AdamW's do, SGD's not in torch 2.13)."""
    if impl == "auto":
        supported = _get_fused_kernels_supported_devices()
        fusable = params and all(p.device.type in supported and p.is_floating_point() for p in params)
        return {"fused": True} if fusable and (fuses_shards or not sharded(params)) else {}
    if impl == "fused":
        if not fuses_shards and sharded(params):
            raise engine.ConfigError(
                "optimizer.impl: torch's fused kernel of this optimizer does not take sharded parameters "
                "(distributed.strategy 'fsdp'): use 'auto' or 'foreach'"
            )
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def groups(params: list[torch.Tensor], decay: Decay, weight_decay: float) -> list[dict[str, Any]]:
    """The parameter groups of `decay`: one, or the matrices (2 or more dimensions: weights of
    linear layers, embeddings) with `weight_decay` and the rest (biases, norms) without."""
    if decay == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    matrices = [p for p in params if p.dim() >= 2]
    others = [p for p in params if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def sharded(params: list[torch.Tensor]) -> bool:
    """Whether the parameters are FSDP2's shards (DTensors, which exist only once their module is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(p, module.DTensor) for p in params)


def built(
    optimizer: type[torch.optim.Optimizer],
    params: Iterable[torch.Tensor],
    impl: Impl,
    decay: Decay = "all",
    weight_decay: float = 0.0,
    fuses_shards: bool = True,
    **settings,
) -> torch.optim.Optimizer:
    """`optimizer` over `params` in the groups `decay` makes, with `settings`, in the
    implementation `impl` asks for."""
    params = list(params)
    chosen = groups(params, decay, weight_decay)
    return optimizer(chosen, weight_decay=weight_decay, **settings, **implementation(impl, params, fuses_shards))


def sgd(
    params: Iterable[torch.Tensor],
    lr: LearningRate = 0.01,
    momentum: NonNegative = 0.0,
    dampening: NonNegative = 0.0,
    weight_decay: NonNegative = 0.0,
    nesterov: bool = False,
    impl: Impl = "auto",
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    if nesterov and (momentum <= 0 or dampening != 0):
        raise engine.ConfigError("optimizer.nesterov: needs momentum > 0 and dampening = 0")
    settings = {"momentum": momentum, "dampening": dampening, "nesterov": nesterov}
    return built(torch.optim.SGD, params, impl, decay, weight_decay, fuses_shards=False, lr=lr, **settings)


def adam(
    params: Iterable[torch.Tensor],
    lr: LearningRate = 0.01,
    betas: tuple[Beta, Beta] = (0.9, 0.999),
    eps: Annotated[float, engine.Range(gt=0)] = 1e-8,
    weight_decay: NonNegative = 0.0,
    amsgrad: bool = False,
    impl: Impl = "auto",
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """Adam; its `weight_decay` is added to the gradient (L2)."""
    return built(torch.optim.Adam, params, impl, decay, weight_decay, lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)


def adamw(
    params: Iterable[torch.Tensor],
    lr: LearningRate = 0.01,
    betas: tuple[Beta, Beta] = (0.9, 0.999),
    eps: Annotated[float, engine.Range(gt=0)] = 1e-8,
    weight_decay: NonNegative = 0.01,
    amsgrad: bool = False,
    impl: Impl = "auto",
    decay: Decay = "all",
) -> torch.optim.Optimizer:
    """AdamW: Adam with `weight_decay` applied to the weights directly (decoupled)."""
    settings = {"betas": betas, "eps": eps, "amsgrad": amsgrad}
    return built(torch.optim.AdamW, params, impl, decay, weight_decay, lr=lr, **settings)


@engine.hookimpl
def register_components():
    return {"default": {"optimizer": "adam"}, "optimizer": {"sgd": sgd, "adam": adam, "adamw": adamw}}
