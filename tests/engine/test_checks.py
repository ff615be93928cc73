"""engine/checks.py: the setup chain's last link, a sample of the training data run as validation
runs it (eval and inference mode, every RNG kept), what hooks return checked there, and the
one-line errors of the setup naming the plugin and hook, the model or the loss at fault."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.checks import expect, in_eval_mode, kept_rng, numbers, shape, whole_set_metrics
from tests.helpers import job


def draws() -> tuple[float, float, float]:
    return random.random(), np.random.rand(), torch.rand(1).item()


class Sampled:
    """Sees the check's sample: the modes it runs in, and draws from every RNG there."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, bool, int]] = []
        self.validations = 0

    @engine.hookimpl
    def before_forward(self, batch, trainer):
        self.seen.append(("before_forward", trainer.model.training, torch.is_inference_mode_enabled(), len(batch.x)))
        draws()

    @engine.hookimpl
    def compute_metrics(self, output, trainer):
        self.seen.append(("compute_metrics", trainer.model.training, torch.is_inference_mode_enabled(), len(output)))
        return {"seen": output.new_tensor(1.0)}

    @engine.hookimpl
    def after_validation(self):
        self.validations += 1


def test_the_sample_runs_as_validation_does_with_every_rng_kept():
    plain = engine.setup(job(seed=3, model={"name": "mlp", "hidden": [4], "dropout": 0.5}))
    expected = draws()
    sampled = Sampled()
    trainer = engine.setup(job(seed=3, model={"name": "mlp", "hidden": [4], "dropout": 0.5}), plugins=[sampled])
    assert draws() == expected  # what the plugins drew in the check left no trace
    assert [(hook, training, inference) for hook, training, inference, _ in sampled.seen] == [
        ("before_forward", False, True),
        ("compute_metrics", False, True),
    ]
    assert sampled.seen[0][3] == len(trainer.loaders.sample().x)
    assert sampled.validations == 1  # ended as a validation is: what was accumulated is reported, and gone
    assert trainer.model.training and plain.model.training  # the modes as they were


def test_a_model_that_does_not_fit_the_sample_is_a_config_error_naming_it_and_the_shapes():
    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 1))

        def forward(self, x):
            return x @ self.weight

    class Provides:
        @engine.hookimpl
        def register_components(self):
            return {"model": {"narrow": lambda info: Narrow()}}

    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(model={"name": "narrow"}), plugins=[Provides])
    assert str(raised.value).startswith(
        "on a sample of the training data: model 'narrow' failed on inputs (100, 1) float32: RuntimeError: "
    )


def test_an_exception_in_a_plugins_hook_during_the_check_names_the_plugin_and_hook():
    class Failing:
        @engine.hookimpl
        def compute_loss(self, output):
            return {"x": helper(output)}

    def helper(output):
        raise KeyError("missing")

    with pytest.raises(
        engine.ConfigError, match=r"^plugin 'Failing' failed in hook compute_loss: KeyError: 'missing'$"
    ):
        engine.setup(job(), plugins=[Failing])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "who returned a int, not None or {name: a tensor of one number}"),
        ({"a": 1.0}, "who returned a float for 'a', not a tensor of one number"),
        ({"a": torch.ones(2, 3)}, "who returned a tensor of shape (2, 3) float32 for 'a', not a tensor of one number"),
        ({1: torch.tensor(1.0)}, "who returned the name 1, not a string"),
    ],
)
def test_numbers_takes_only_a_dict_of_tensors_of_one_number(value, message):
    with pytest.raises(engine.ConfigError) as raised:
        numbers(value, "who")
    assert str(raised.value) == message


def test_what_passes_the_checks_comes_back_unchanged():
    terms = {"a": torch.tensor(1.0), "b": torch.ones(1, 1)}
    assert numbers(terms, "who") is terms and numbers(None, "who") == {}
    batch = engine.Batch(1, 2)
    assert expect(batch, engine.Batch, "who") is batch and expect(None, engine.Batch, "who") is None
    with pytest.raises(engine.ConfigError, match=r"^who returned a tuple, not None or an engine.Batch$"):
        expect((1, 2), engine.Batch, "who")
    assert shape(torch.zeros(8, 3, dtype=torch.int64)) == "(8, 3) int64" and shape([1]) == "of type list"


def test_whole_set_metrics_merges_every_plugins_and_refuses_a_name_twice():
    class Reports:
        @engine.hookimpl
        def after_validation(self):
            return {"f1": 0.5, "auroc": torch.tensor(0.75)}

    trainer = engine.setup(job(), plugins=[Reports])
    merged = whole_set_metrics(trainer)
    assert set(merged) == {"f1", "auroc"} and all(isinstance(value, torch.Tensor) for value in merged.values())
    assert merged["f1"].item() == 0.5
    with pytest.raises(engine.TrainingError, match=r"^hook after_validation: a second metric named 'f1'$"):
        whole_set_metrics(trainer, taken={"f1": torch.tensor(0.0)})  # also a batch metric


def test_in_eval_mode_restores_the_mode_of_every_submodule():
    model = nn.Sequential(nn.Linear(1, 1), nn.Dropout(0.5))
    model[1].eval()  # mixed modes, as a plugin may leave them
    with in_eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == [True, True, False]


def test_kept_rng_restores_python_numpy_and_torch():
    with kept_rng(torch.device("cpu")):
        inside = draws()
    assert draws() == inside
