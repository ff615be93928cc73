"""Image augmentation on the device, on each training batch (`[augment]`): random crops of the
images padded by ``crop_padding`` pixels (a shift of up to that many pixels, the border filled
with zeros), and left-right mirroring of half of them (``flip``). Off by default.

It runs in `before_forward` as tensor work only, drawing from the torch RNG of the batch's device
as dropout does: seeded by the run's seed, saved in every checkpoint, so a resumed run draws
what the uninterrupted one drew, and captured or compiled steps draw anew at each step. In eval
mode (validation, the test, the setup chain's check) batches pass unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

import engine


@dataclass(frozen=True)
class AugmentSettings:
    crop_padding: Annotated[int, engine.Range(ge=0)] = 0  # pixels of shift in each direction; 0: no crops
    flip: bool = False  # mirror images left-right, each with probability 1/2


@engine.hookimpl
def register_settings():
    return {"augment": AugmentSettings}


@engine.hookimpl
def skip_per_step(trainer: engine.TrainerView) -> bool:
    """Off unless asked; asked on data that is not images, a ConfigError (in the setup chain)."""
    settings = trainer.config["augment"]
    if not (settings["crop_padding"] or settings["flip"]):
        return True
    shape = tuple(trainer.info.input_shape)
    if len(shape) < 2:
        key = "crop_padding" if settings["crop_padding"] else "flip"
        raise engine.ConfigError(
            f"augment.{key}: the data's samples have shape {shape or (trainer.info.n_features,)}, not images "
            "(C, H, W or H, W)"
        )
    return False


@engine.hookimpl
def before_forward(batch: engine.Batch, trainer: engine.TrainerView) -> engine.Batch | None:
    if not trainer.model.training:  # validation and the test see the images as they are
        return None
    settings = trainer.config["augment"]
    x = batch.x
    if settings["crop_padding"]:
        x = random_crop(x, settings["crop_padding"])
    if settings["flip"]:
        x = random_flip(x)
    return engine.Batch(x, batch.y)


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image of `x` (N x ... x H x W) padded with `padding` zeros on every side and cropped
    back to H x W at a random place: two gathers, no per-sample Python."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, x.shape[0]), device=x.device)
    middle = (1,) * (x.dim() - 3)  # the dimensions between the batch and the image: channels
    rows = (offsets[0].view(-1, *middle, 1, 1) + torch.arange(height, device=x.device).view(-1, 1)).expand(
        *x.shape[:-2], height, padded.shape[-1]
    )
    cropped = padded.gather(-2, rows)
    columns = (offsets[1].view(-1, *middle, 1, 1) + torch.arange(width, device=x.device)).expand(x.shape)
    return cropped.gather(-1, columns)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Each image of `x` mirrored left-right with probability 1/2."""
    flipped = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flipped.view(-1, *(1,) * (x.dim() - 1)), x.flip(-1), x)
