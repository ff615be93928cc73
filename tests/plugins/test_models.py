"""plugins/models.py: linear and mlp built from [model], sized from the data; a user nn.Module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from tests.helpers import Scaled, job

CLASSIFICATION = {"name": "classification", "n_samples": 40, "n_features": 5, "n_classes": 3}


def model(**section) -> nn.Module:
    data = section.pop("data", CLASSIFICATION)
    return engine.setup(job(data=data, model=section, loss={"name": "cross_entropy"})).model


def test_linear_is_sized_from_the_data():
    linear = model(name="linear")
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (5, 3)
    explicit = model(name="linear", out_features=6, bias=False)
    assert explicit.out_features == 6 and explicit.bias is None


def test_linear_init_is_the_tutorials_after_the_seed():
    torch.manual_seed(42)
    expected = nn.Linear(1, 1)
    built = engine.setup(job()).model
    assert torch.equal(built.weight, expected.weight) and torch.equal(built.bias, expected.bias)


def test_mlp_hidden_sizes_and_activation():
    mlp = model(name="mlp", hidden=[16, 8], activation="gelu")
    kinds = [type(layer) for layer in mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(layer.in_features, layer.out_features) for layer in mlp if isinstance(layer, nn.Linear)] == [
        (5, 16),
        (16, 8),
        (8, 3),
    ]


def test_mlp_dropout_and_layer_norm():
    mlp = model(name="mlp", hidden=[4], dropout=0.25, layer_norm=True)
    assert [type(layer) for layer in mlp] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear]
    assert mlp[3].p == 0.25


def test_mlp_default_is_two_hidden_layers_of_64():
    mlp = model(name="mlp")
    assert [layer.out_features for layer in mlp if isinstance(layer, nn.Linear)] == [64, 64, 3]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"activation": "swish"},
            "model.activation: expected one of 'relu', 'gelu', 'tanh', 'sigmoid', 'silu', 'leaky_relu', got 'swish'",
        ),
        ({"dropout": 1.0}, "model.dropout: must be < 1, got 1.0"),
        ({"hidden": 64}, "model.hidden: expected a list, got 64"),
    ],
)
def test_mlp_settings_are_checked(section, message):
    with pytest.raises(engine.ConfigError) as raised:
        model(name="mlp", **section)
    assert str(raised.value).startswith(message)


def test_a_user_module_by_reference_with_its_own_settings():
    trainer = engine.setup(job(model={"name": "tests.helpers:scaled_model", "scale": 0.5}))
    assert isinstance(trainer.model, Scaled) and trainer.model.scale == 0.5
    assert (trainer.model.linear.in_features, trainer.model.linear.out_features) == (1, 1)
    result = trainer.fit()
    assert result.metrics["loss"] > 0


def test_a_failing_user_factory_is_a_config_error_naming_it():
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(model={"name": "tests.helpers:scaled_model", "scale": "big"}))
    assert str(raised.value) == "model.scale: expected float, got 'big'"
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(model={"name": "tests.helpers:Scaled"}))  # a class: its parameters are settings
    assert str(raised.value) == "model.n_in: required setting is missing"
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(model={"name": "tests.helpers:broken_model"}))
    assert str(raised.value) == "model 'tests.helpers:broken_model' cannot be built: ValueError: no weights file"
