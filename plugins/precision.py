"""Mixed precision: ``precision = "32" | "bf16-mixed" | "16-mixed"`` (default "32").

The mixed modes run forward and loss under ``torch.autocast`` (bf16 or fp16); parameters,
gradients and the optimizer stay float32. "16-mixed" adds a ``GradScaler`` so small fp16
gradients do not underflow: the loss is scaled before backward, the gradients are unscaled before
any `before_optimizer_step` hook (clipping sees true gradients), and a step whose gradients
overflowed is skipped. With a fused optimizer the scaler hands the inf check to the optimizer's
kernel, so the step stays free of host-device syncs (and can be captured in a CUDA graph); with
any other optimizer ``GradScaler.step`` reads the inf flag back once per step.
"""

from __future__ import annotations

import functools

import torch

import engine

DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@engine.hookimpl
def register_settings():
    return {"": {"precision": "32"}}


@engine.hookimpl
def on_run_start(trainer: engine.Trainer) -> None:
    precision = trainer.config["precision"]
    if precision != "32" and precision not in DTYPES:
        raise engine.ConfigError(f"precision: expected '32', 'bf16-mixed' or '16-mixed', got {precision!r}")
    if precision == "32":
        return
    device = trainer.device.type
    # A partial of torch.autocast (not one shared instance) so torch.compile traces a fresh context.
    # No cast cache: a CUDA graph must not capture casts of the weights cached from an earlier step
    # (PyTorch's CUDA-graph notes), and the weights here are cast once per forward anyway.
    trainer.autocast = functools.partial(
        torch.autocast, device_type=device, dtype=DTYPES[precision], cache_enabled=False
    )
    if precision == "16-mixed":
        trainer.scaler = torch.amp.GradScaler(device)


@engine.hookimpl(tryfirst=True)  # before gradient clipping, which must see unscaled gradients
def before_optimizer_step(trainer: engine.Trainer) -> None:
    if trainer.scaler is not None:
        trainer.scaler.unscale_(trainer.optimizer)
