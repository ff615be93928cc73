"""engine/schema.py: settings typed from annotations; every value that does not fit is one line
naming the key, before training (and before any run directory exists)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from torch import nn

import engine
from engine.schema import MISSING, convert, is_path, settings_of, type_words

Positive = Annotated[float, engine.Range(gt=0)]


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (float, 1, 1.0),
        (int, 3, 3),
        (bool, False, False),
        (str, "x", "x"),
        (Literal["a", "b"], "b", "b"),
        (tuple[float, float], [1, 2.5], (1.0, 2.5)),
        (tuple[int, ...], [], ()),
        (list[int], (1, 2), [1, 2]),
        (int | None, None, None),
        (bool | None, True, True),
        (Positive, 0.5, 0.5),
        (Annotated[int, engine.Range(ge=0, le=2)], 2, 2),
        (tuple[Annotated[int, engine.Range(ge=1)], ...], [1, 8], (1, 8)),
        (Any, {"free": "form"}, {"free": "form"}),
        (dict[str, float], {"a": 1, "b.c": 2.5}, {"a": 1.0, "b.c": 2.5}),
        (dict[str, dict[str, Any]], {"optimizer.lr": {"log": [1e-4, 0.1]}}, {"optimizer.lr": {"log": [1e-4, 0.1]}}),
        (dict[str, list[int]], {}, {}),
    ],
)
def test_values_that_fit_are_converted_to_the_annotated_type(annotation, value, expected):
    converted = convert("k", value, annotation)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        (float, "fast", "k: expected float, got 'fast'"),
        (float, True, "k: expected float, got True"),
        (int, 1.5, "k: expected int, got 1.5"),
        (bool, 1, "k: expected bool, got 1"),
        (Literal["mean", "sum"], "bogus", "k: expected one of 'mean', 'sum', got 'bogus'"),
        (
            Literal["fused", "foreach"],
            "fuse",
            "k: expected one of 'fused', 'foreach', got 'fuse' (did you mean 'fused'?)",
        ),
        (Literal[1, 2], "1", "k: expected one of 1, 2, got '1'"),
        (tuple[float, float], [0.9], "k: expected 2 values, got 1: [0.9]"),
        (tuple[float, ...], 0.9, "k: expected a list, got 0.9"),
        (list[int], [1, "x"], "k[1]: expected int, got 'x'"),
        (Positive, 0, "k: must be > 0, got 0"),
        (Positive, float("nan"), "k: must be > 0, got nan"),
        (Annotated[float, engine.Range(ge=0, lt=1)], 1.0, "k: must be < 1, got 1.0"),
        (Annotated[int, engine.Range(ge=2, le=4)], 9, "k: must be <= 4, got 9"),
        (int | None, "x", "k: expected int, got 'x'"),
        (dict[str, int], [1], "k: expected a table, got [1]"),
        (dict[str, int], {"a": 1, "optimizer.lr": "x"}, "k.\"optimizer.lr\": expected int, got 'x'"),
        (dict[str, Positive], {"a_b-1": 0}, "k.a_b-1: must be > 0, got 0"),
    ],
)
def test_values_that_do_not_fit_are_one_line_naming_the_key(annotation, value, message):
    with pytest.raises(engine.ConfigError) as raised:
        convert("k", value, annotation)
    assert str(raised.value) == message


def test_settings_come_from_keyword_parameters_with_their_annotations_and_defaults():
    def factory(info, width: Annotated[int, engine.Range(ge=1)] = 8, scale=1.0, tag="x", required: int = MISSING):
        return None

    found = settings_of(factory, "model 'mine'", context=("info",))
    assert list(found) == ["width", "scale", "tag", "required"]
    assert found["width"].default == 8 and found["width"].owner == "model 'mine'"
    assert found["scale"].annotation is float and found["tag"].annotation is str  # from the defaults
    assert found["required"].default is MISSING


@dataclass(frozen=True)
class Settings:
    rate: Positive = 0.1
    mode: Literal["fast", "exact"] = "exact"


def test_a_settings_dataclass_declares_its_schema():
    found = settings_of(Settings, "plugin 'p'")
    assert convert("s.rate", 2, found["rate"].annotation) == 2.0
    with pytest.raises(engine.ConfigError, match=r"s.mode: expected one of 'fast', 'exact', got 'quick'"):
        convert("s.mode", "quick", found["mode"].annotation)


def test_an_annotation_that_does_not_evaluate_names_its_owner():
    def factory(size: NoSuchType = 1):  # noqa: F821
        return None

    with pytest.raises(engine.ConfigError, match=r"model 'mine': cannot read the settings' annotations: NameError"):
        settings_of(factory, "model 'mine'")


@pytest.mark.parametrize(
    ("annotation", "words"),
    [
        (float, "float"),
        (Positive, "float"),
        (int | None, "int or unset"),
        (tuple[float, float], "a list of 2 values"),
        (tuple[int, ...], "a list of int"),
        (list[str], "a list of str"),
        (Literal["a", 1], "one of 'a', 1"),
        (dict[str, float], "a table of float"),
        (dict[str, Any], "a table"),
    ],
)
def test_an_annotation_in_words(annotation, words):
    assert type_words(annotation) == words


def test_a_file_path_setting_is_marked_by_its_annotation_and_resolved_against_the_job_file(tmp_path):
    assert is_path(engine.FilePath) and not is_path(str) and not is_path(Positive)

    def reader(path: engine.FilePath = ""):
        return None

    class Reading:
        @engine.hookimpl
        def register_components(self):
            return {"reader": {"file": reader}}

    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.toml").write_text('[reader]\nname = "file"\npath = "data.npz"\n')
    config, _ = engine.load_config(tmp_path / "jobs" / "job.toml", plugins=[Reading])
    assert config["reader"]["path"] == str(tmp_path / "jobs" / "data.npz")  # the job file's folder
    config, _ = engine.load_config(None, ["reader.name=file", "reader.path=data.npz"], plugins=[Reading])
    assert config["reader"]["path"] == str(tmp_path / "data.npz")  # --set: where the command runs


# --- through the config: the built-in components' schemas -----------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["seed=-1"], "seed: must be >= 0, got -1"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0, got 0"),
        (["optimizer.betas=[0.9]"], "optimizer.betas: expected 2 values, got 1: [0.9]"),
        (["optimizer.betas=[0.9, 1.5]"], "optimizer.betas[1]: must be < 1, got 1.5"),
        (["optimizer.impl=fuse"], "optimizer.impl: expected one of 'auto', 'fused', 'foreach', 'for_loop', got 'fuse'"),
        (["loss.reduction=bogus"], "loss.reduction: expected one of 'mean', 'sum', got 'bogus'"),
        (["scheduler.name=step", "scheduler.step_size=0"], "scheduler.step_size: must be >= 1, got 0"),
        (["scheduler.name=onecycle", "scheduler.max_lr=-1"], "scheduler.max_lr: must be > 0, got -1"),
        (["model.name=mlp", "model.hidden=[64, 0]"], "model.hidden[1]: must be >= 1, got 0"),
        (["model.name=mlp", "model.activation=rellu"], "model.activation: expected one of 'relu'"),
        (["plugins=[1]"], "plugins[0]: expected str, got 1"),
        (["log.every=-1"], "log.every: must be >= 0, got -1"),
        (["precision.name=fp8"], "precision.name: unknown precision 'fp8'"),
        (["accelerate.name=auto", "accelerate.steps=2"], "accelerate.steps: must be >= 5, got 2"),
    ],
)
def test_bad_values_are_config_errors_before_any_run_directory(overrides, message, tmp_path):
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(None, overrides=overrides)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "runs").exists()


class Model(nn.Module):
    def __init__(self, params: int) -> None:
        super().__init__()
        self.layer = nn.Linear(1, params)

    def forward(self, x):
        return self.layer(x)


def model_with_params(info: engine.DataInfo, params: int = 1) -> nn.Module:
    """A model whose setting is named `params`: context only for optimizers."""
    return nn.Sequential(Model(params), nn.Linear(params, info.n_outputs))


def test_context_parameters_are_per_component_kind():
    config, _ = engine.load_config({"model": {"name": "tests.engine.test_schema:model_with_params", "params": 3}})
    assert config["model"]["params"] == 3
    trainer = engine.setup(config)
    assert trainer.module[0].layer.out_features == 3


def test_a_job_file_is_checked_by_the_same_schema(tmp_path):
    bad = Path(tmp_path / "job.toml")
    bad.write_text("[optimizer]\nlr = 0\n")
    with pytest.raises(engine.ConfigError, match=r"optimizer.lr: must be > 0, got 0"):
        engine.load_config(bad)
