"""plugins/cnn.py: the convolutional network sized from the data's images (C x H x W, or H x W),
its settings checked, and trained through the engine as the hand-written loop trains it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import engine
from tests.helpers import bar_images, epoch_order, job

BARS = {"name": "tests.helpers:bar_images", "n_samples": 40}


def model(data=BARS, **section) -> nn.Module:
    return engine.setup(job(data=data, model={"name": "cnn", **section}, loss={"name": "cross_entropy"})).model


def kinds(network: nn.Module) -> list[type]:
    return [type(layer) for layer in network]


def test_the_cnn_is_sized_from_the_images():
    cnn = model(channels=[4, 8], hidden=[16])
    assert kinds(cnn) == [
        *(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d) * 2,
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    assert (cnn[0].in_channels, cnn[0].out_channels, cnn[0].kernel_size, cnn[0].padding) == (1, 4, (3, 3), (1, 1))
    assert cnn[0].bias is None  # batch norm's shift replaces it
    assert (cnn[4].in_channels, cnn[4].out_channels) == (4, 8)
    assert (cnn[9].in_features, cnn[9].out_features) == (8 * 2 * 2, 16)  # 8x8 pooled twice
    assert (cnn[11].in_features, cnn[11].out_features) == (16, 3)  # the data's classes
    assert cnn(torch.zeros(5, 1, 8, 8)).shape == (5, 3)


def test_the_cnn_settings_change_what_is_built():
    settings = {"convs": 2, "kernel": 5, "batch_norm": False, "pool": "avg", "activation": "gelu", "dropout": 0.5}
    cnn = model(channels=[4], hidden=[], **settings)
    assert kinds(cnn) == [nn.Conv2d, nn.GELU, nn.Conv2d, nn.GELU, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert cnn[0].kernel_size == (5, 5) and cnn[0].padding == (2, 2) and cnn[0].bias is not None
    assert cnn[2].in_channels == 4 and cnn[6].p == 0.5 and cnn[7].in_features == 4 * 4 * 4
    unpooled = model(channels=[4], pool="none", hidden=[])
    assert unpooled[-1].in_features == 4 * 8 * 8
    averaged = model(channels=[4, 8], head="average", hidden=[], out_features=7)
    assert nn.AdaptiveAvgPool2d in kinds(averaged) and (averaged[-1].in_features, averaged[-1].out_features) == (8, 7)


def test_the_cnn_takes_colour_images_and_images_without_a_channel_axis(tmp_path):
    colour = model(data={**BARS, "channels": 3}, channels=[4], hidden=[])
    assert colour[0].in_channels == 3 and colour(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    x, y = bar_images(0, 30)
    np.savez(tmp_path / "plain.npz", x=x[:, 0], y=y)  # N x H x W, read as it is by `npz`
    plain = {"name": "npz", "path": str(tmp_path / "plain.npz")}
    trainer = engine.setup(job(data=plain, model={"name": "cnn"}, loss={"name": "cross_entropy"}))
    assert trainer.info.input_shape == (8, 8)
    assert trainer.model(torch.zeros(2, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("data", "section", "message"),
    [
        (BARS, {"kernel": 4}, "model.kernel: an odd size (3, 5, 7) keeps the image's size, got 4"),
        (
            BARS,
            {"channels": [4, 4, 4, 4]},
            'model.channels: stage 4 of 4 pools 1x1 feature maps to nothing; fewer stages, or pool = "none"',
        ),
        (BARS, {"channels": [0]}, "model.channels[0]: must be >= 1, got 0"),
        (BARS, {"head": "max"}, "model.head: expected one of 'flatten', 'average', got 'max'"),
        (
            {"name": "classification", "n_samples": 20, "n_features": 5},
            {},
            "model 'cnn': the data's samples have shape (5,), not images (C, H, W or H, W)",
        ),
    ],
)
def test_the_cnn_says_what_does_not_fit(data, section, message):
    with pytest.raises(engine.ConfigError) as raised:
        model(data=data, **section)
    assert str(raised.value).startswith(message)


def test_training_the_cnn_matches_a_hand_written_loop():
    """Minibatches in the documented order, batch norm in training mode, Adam: the engine's run is
    the hand-written loop's, step for step."""
    seed, epochs, batch_size, n = 5, 3, 16, 40
    x, y = (torch.from_numpy(array) for array in bar_images(seed, n))
    torch.manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    for epoch in range(1, epochs + 1):
        order = epoch_order(seed, epoch, n)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(network(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    result = engine.run(
        job(
            seed=seed,
            epochs=epochs,
            data={**BARS, "batch_size": batch_size},
            model={"name": "cnn", "channels": [4], "hidden": [8]},
            loss={"name": "cross_entropy"},
            optimizer={"name": "adam", "lr": 0.01, "impl": "foreach"},
        )
    )
    assert result.state.step == epochs * 3
    for mine, theirs in zip(result.model.state_dict().values(), network.state_dict().values()):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)  # running statistics too


def test_the_cnn_learns_the_bars_and_loads_from_its_run():
    result = engine.run(
        job(
            epochs=10,
            data={**BARS, "n_samples": 90, "batch_size": 24, "val_fraction": 0.25},
            model={"name": "cnn", "channels": [8], "hidden": [16]},
            loss={"name": "cross_entropy"},
            optimizer={"name": "adam", "lr": 0.01},
            log={"every": 10},
        )
    )
    assert result.metrics["val_accuracy"] >= 0.9
    assert result.config["inferred"]["input_shape"] == (1, 8, 8)
    loaded = engine.load(result.run_dir, trust=True)  # its data is a factory of ours
    x = torch.from_numpy(bar_images(1, 10)[0])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))
