"""plugins/augment.py: random crops and flips of the training batches, drawn on the device from the
run's seeded RNG; validation, the test and the setup check see the images as they are; a resumed
run draws what the uninterrupted one drew."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from engine_plugins.augment import random_crop, random_flip

import engine
from tests.helpers import job

BARS = {"name": "tests.helpers:bar_images", "n_samples": 40, "batch_size": 16, "val_fraction": 0.25}
CNN = {"name": "cnn", "channels": [4], "hidden": [8], "dropout": 0.2}


def offsets_of(images: torch.Tensor, cropped: torch.Tensor, padding: int) -> list[tuple[int, int] | None]:
    """Where each cropped image sits in its image padded with zeros: (row, column), None if nowhere."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding,) * 4)
    found = []
    for image, crop in zip(padded, cropped):
        places = [
            (row, column)
            for row in range(2 * padding + 1)
            for column in range(2 * padding + 1)
            if torch.equal(image[..., row : row + height, column : column + width], crop)
        ]
        found.append(places[0] if len(places) == 1 else None)
    return found


def test_a_random_crop_is_a_window_of_the_padded_image_at_every_offset():
    images = torch.rand(300, 3, 6, 5)
    torch.manual_seed(0)
    cropped = random_crop(images, 2)
    assert cropped.shape == images.shape
    offsets = offsets_of(images, cropped, 2)
    assert None not in offsets
    assert set(offsets) == {(row, column) for row in range(5) for column in range(5)}  # each of the 25
    torch.manual_seed(0)
    assert torch.equal(random_crop(images, 2), cropped)  # drawn from the seeded RNG
    plain = torch.rand(50, 7, 7)  # N x H x W
    assert None not in offsets_of(plain, random_crop(plain, 1), 1)


def test_a_random_flip_mirrors_about_half_of_the_images():
    images = torch.rand(400, 2, 4, 4)
    flipped = random_flip(images)
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped, images)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, images)])
    assert bool((mirrored ^ kept).all())
    assert 150 < int(mirrored.sum()) < 250


class Seen:
    """The batches as the loaders give them (before every other plugin's before_forward), with the
    model's mode; `Given` records them as the model receives them (after every other's)."""

    def __init__(self) -> None:
        self.raw: list[tuple[bool, torch.Tensor]] = []
        self.given: list[torch.Tensor] = []

    @engine.hookimpl(tryfirst=True)
    def before_forward(self, batch, trainer):
        self.raw.append((trainer.model.training, batch.x.clone()))


class Given:
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    @engine.hookimpl(trylast=True)
    def before_forward(self, batch):
        self.seen.given.append(batch.x.clone())


def test_training_batches_are_cropped_and_flipped_and_held_out_ones_are_not():
    seen = Seen()
    job_ = job(epochs=2, data=BARS, model=CNN, loss={"name": "cross_entropy"})
    engine.run({**job_, "augment": {"crop_padding": 1, "flip": True}}, plugins=[seen, Given(seen)])
    assert len(seen.raw) == len(seen.given) == 1 + 2 * 2 + 2  # the setup check, 2 epochs of 2 batches, 2 validations
    for (training, raw), given in zip(seen.raw, seen.given):
        if not training:
            assert torch.equal(given, raw)  # the check's sample and the validation batches
            continue
        unflipped = [offsets_of(raw[i : i + 1], image[None], 1)[0] for i, image in enumerate(given)]
        flipped = [offsets_of(raw[i : i + 1].flip(-1), image[None], 1)[0] for i, image in enumerate(given)]
        assert all(a is not None or b is not None for a, b in zip(unflipped, flipped))
        assert not torch.equal(given, raw)
    assert [training for training, _ in seen.raw].count(True) == 4


def test_augmentation_is_off_by_default_and_refused_on_data_that_is_not_images():
    seen = Seen()
    engine.run(job(epochs=1, data=BARS, model=CNN, loss={"name": "cross_entropy"}), plugins=[seen, Given(seen)])
    assert all(torch.equal(given, raw) for (_, raw), given in zip(seen.raw, seen.given))
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(augment={"flip": True}, run_name="tabular"))
    assert str(raised.value) == "augment.flip: the data's samples have shape (1,), not images (C, H, W or H, W)"


class Interrupt:
    """Sends this process SIGTERM after step `at`: the run ends its window, checkpoints and stops."""

    def __init__(self, at: int) -> None:
        self.at = at

    @engine.hookimpl
    def after_step(self, state):
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_resumed_run_draws_the_crops_and_flips_of_the_uninterrupted_one():
    augmented = job(
        epochs=3,
        data=BARS,
        model=CNN,
        loss={"name": "cross_entropy"},
        augment={"crop_padding": 1, "flip": True},
        log={"every": 1},
    )
    whole = engine.run({**augmented, "run_name": "whole"})
    with pytest.raises(engine.Interrupted):
        engine.run({**augmented, "run_name": "stopped"}, plugins=[Interrupt(at=3)])  # epoch 2, its first batch
    resumed = engine.run(resume=whole.run_dir.parent / "stopped", trust=True)  # its data is a factory of ours
    assert resumed.state.step == whole.state.step == 6
    for name, weight in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    unaugmented = engine.run({**augmented, "augment": {}, "run_name": "plain"})
    assert not torch.equal(unaugmented.model.state_dict()["0.weight"], whole.model.state_dict()["0.weight"])
