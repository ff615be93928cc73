"""plugins/optimizers.py: sgd, adam and adamw with their settings, equal to torch's own, and the
choice of implementation (fused where the device has it)."""

from __future__ import annotations

import pytest
import torch
from engine_plugins import optimizers
from torch import nn

import engine
from tests.helpers import job, tutorial_data


def hand_written(make_optimizer, epochs: int = 5) -> nn.Linear:
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = make_optimizer(model.parameters())
    for _ in range(epochs):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize(
    ("section", "make"),
    [
        ({"name": "sgd", "lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
        (
            {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        ({"name": "adam", "betas": [0.8, 0.9]}, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.9))),
        ({"name": "adam", "amsgrad": True}, lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
        ({"name": "adamw", "lr": 0.02}, lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.01)),
    ],
)
def test_each_optimizer_matches_torchs(section, make):
    result = engine.run(job(epochs=5, optimizer=section))
    expected = hand_written(make)
    torch.testing.assert_close(result.model.weight, expected.weight)
    torch.testing.assert_close(result.model.bias, expected.bias)


def test_settings_reach_the_optimizer():
    trainer = engine.setup(job(optimizer={"name": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True}))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    defaults = trainer.optimizer.defaults
    assert (defaults["lr"], defaults["momentum"], defaults["nesterov"]) == (0.3, 0.9, True)
    adamw = engine.setup(job(optimizer={"name": "adamw"})).optimizer
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01


def test_auto_picks_the_fused_kernel_on_cpu():
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this torch has no fused CPU optimizers")
    for name in ("sgd", "adam", "adamw"):
        assert engine.setup(job(optimizer={"name": name})).optimizer.defaults["fused"] is True, name


@pytest.mark.parametrize(
    ("impl", "expected"),
    [("fused", {"fused": True}), ("foreach", {"foreach": True}), ("for_loop", {"foreach": False})],
)
def test_impl_can_be_chosen(impl, expected):
    defaults = engine.setup(job(optimizer={"impl": impl})).optimizer.defaults
    assert {key: defaults[key] for key in expected} == expected


def test_auto_leaves_integer_or_empty_parameter_lists_to_torch():
    assert optimizers.implementation("auto", []) == {}
    assert optimizers.implementation("auto", [torch.zeros(2, dtype=torch.long)]) == {}


def test_an_unknown_impl_is_a_config_error():
    with pytest.raises(
        engine.ConfigError, match=r"optimizer.impl: expected one of 'auto', 'fused', 'foreach', 'for_loop', got 'fast'"
    ):
        engine.setup(job(optimizer={"impl": "fast"}))


def test_the_default_learning_rate_is_the_tutorials():
    config, _ = engine.load_config()
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 0.01
