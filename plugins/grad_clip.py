"""Gradient clipping by total norm, before each optimizer step (`[grad_clip] max_norm`, 0 = off).

Uses torch's foreach kernel and never reads the norm back, so it adds no host-device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

import engine


@dataclass(frozen=True)
class GradClip:
    max_norm: Annotated[float, engine.Range(ge=0)] = 0.0  # 0: off
    norm_type: Annotated[float, engine.Range(gt=0)] = 2.0


@engine.hookimpl
def register_settings():
    return {"grad_clip": GradClip}


@engine.hookimpl
def skip_per_step(trainer: engine.TrainerView) -> bool:
    return trainer.config["grad_clip"]["max_norm"] == 0


@engine.hookimpl
def before_optimizer_step(trainer: engine.TrainerView) -> None:
    settings = trainer.config["grad_clip"]
    torch.nn.utils.clip_grad_norm_(
        trainer.model.parameters(), settings["max_norm"], norm_type=settings["norm_type"], foreach=True
    )
