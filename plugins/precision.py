"""The ``[precision]`` components: ``"32"`` (the default), ``"bf16-mixed"`` and ``"16-mixed"``.

The mixed ones run forward and loss under ``torch.autocast`` (bf16 or fp16); parameters,
gradients and the optimizer stay float32. ``"16-mixed"`` adds a ``GradScaler`` so small fp16
gradients do not underflow: the core scales the loss before backward, unscales the gradients
before any `before_optimizer_step` hook (clipping sees true gradients) and skips a step whose
gradients overflowed. With a fused optimizer the scaler hands the inf check to the optimizer's
kernel, so the step stays free of host-device syncs (and can be captured in a CUDA graph); with
any other optimizer ``GradScaler.step`` reads the inf flag back once per step.
"""

from __future__ import annotations

import torch

import engine


def full(device: torch.device) -> engine.Precision:
    """float32 throughout."""
    return engine.Precision(device.type)


def bf16_mixed(device: torch.device) -> engine.Precision:
    """Forward and loss under bf16 autocast."""
    return engine.Precision(device.type, torch.bfloat16)


def fp16_mixed(device: torch.device) -> engine.Precision:
    """Forward and loss under fp16 autocast, with a gradient scaler."""
    return engine.Precision(device.type, torch.float16, torch.amp.GradScaler(device.type))


@engine.hookimpl
def register_components():
    return {"default": {"precision": "32"}, "precision": {"32": full, "bf16-mixed": bf16_mixed, "16-mixed": fp16_mixed}}
