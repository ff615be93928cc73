"""engine/config.py: defaults, `--set` typing, validation with suggestions, TOML in and out."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Annotated, Any

import pytest

import engine
from engine.config import apply_overrides, load_job

EXPECTED_DEFAULTS = {
    "seed": 42,
    "epochs": 1000,  # neither epochs nor max_steps given
    "max_steps": None,
    "device": "auto",
    "plugins": (),
    "grad_accumulation": 1,
    "val_every": 1,
    "val_every_steps": 0,
    "run_name": "",
    "runs_dir": "runs",
    "resume": "",
    "inferred": {
        "n_features": 0,
        "n_outputs": 0,
        "task": "",
        "threshold": 0.5,
        "input_transform": "",
        "input_shape": (),
        "classes": (),
    },
    "data": {
        "name": "linear_regression",
        "batch_size": 0,
        "shuffle": True,
        "drop_last": False,
        "val_fraction": 0.0,
        "test_fraction": 0.0,
        "split_seed": 0,
        "stratify": True,
        "standardize": False,
        "task": "auto",
        "threshold": 0.5,
        "num_workers": 0,
        "pin_memory": False,
        "target_key": "labels",
        "n_samples": 100,
        "weight": 2.0,
        "bias": 3.0,
        "noise": 0.1,
    },
    "model": {"output": "", "targets": "", "name": "linear", "in_features": 0, "out_features": 0, "bias": True},
    "loss": {"name": "mse", "reduction": "mean"},
    "optimizer": {
        "name": "adam",
        "lr": 0.01,
        "betas": (0.9, 0.999),
        "eps": 1e-08,
        "weight_decay": 0.0,
        "amsgrad": False,
        "impl": "auto",
        "decay": "all",
    },
    "scheduler": {"name": "none"},
    "precision": {"name": "32"},
    "accelerate": {"name": "eager"},
    "log": {"every": 0, "every_steps": 0, "train_metrics": True, "curves": True, "progress": True},
    "grad_clip": {"max_norm": 0.0, "norm_type": 2.0},
}


def resolved(job=None, *overrides: str) -> dict:
    config, _ = engine.load_config(job, overrides)
    return config.to_dict()


def test_every_setting_has_a_default_and_the_default_job_is_the_tutorial():
    defaults = resolved()
    # Sections that other plugins add (acceleration, checkpoints, ...) are theirs to test.
    assert {key: defaults[key] for key in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS
    assert (defaults["seed"], defaults["epochs"], defaults["device"]) == (42, 1000, "auto")


def test_a_component_section_takes_the_chosen_components_parameters():
    config = resolved({"loss": {"name": "cross_entropy"}, "optimizer": {"name": "sgd"}})
    assert config["loss"] == {
        "name": "cross_entropy",
        "reduction": "mean",
        "label_smoothing": 0.0,
        "weight": (),
        "ignore_index": -100,
    }
    assert config["optimizer"] == {
        "name": "sgd",
        "lr": 0.01,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "impl": "auto",
        "decay": "all",
    }


@pytest.mark.parametrize(
    ("override", "path", "value"),
    [
        ("epochs=5", ("epochs",), 5),
        ("optimizer.lr=0.5", ("optimizer", "lr"), 0.5),
        ("optimizer.lr=1", ("optimizer", "lr"), 1.0),  # an int where a float is expected
        ("optimizer.lr=3e-4", ("optimizer", "lr"), 3e-4),
        ("data.shuffle=false", ("data", "shuffle"), False),
        ("optimizer.amsgrad=true", ("optimizer", "amsgrad"), True),
        ("loss.name=l1", ("loss", "name"), "l1"),
        ('loss.name="huber"', ("loss", "name"), "huber"),
        ("run_name=2024", ("run_name",), "2024"),  # text kept where a string is expected
        ("run_name=true", ("run_name",), "true"),
        ("runs_dir=out/runs", ("runs_dir",), "out/runs"),
        ("optimizer.betas=[0.8, 0.99]", ("optimizer", "betas"), (0.8, 0.99)),
        ("plugins=[]", ("plugins",), ()),
        ("precision.name=32", ("precision", "name"), "32"),
        ("data.val_fraction=0.25", ("data", "val_fraction"), 0.25),
    ],
)
def test_set_overrides_are_typed(override, path, value):
    config = resolved(None, override)
    for key in path:
        config = config[key]
    assert config == value and type(config) is type(value)


def test_set_list_for_mlp_hidden_sizes():
    config = resolved({"model": {"name": "mlp"}}, "model.hidden=[128,32]", "model.activation=gelu")
    assert config["model"]["hidden"] == (128, 32) and config["model"]["activation"] == "gelu"


def test_overrides_apply_on_top_of_the_job_and_later_ones_win():
    merged = apply_overrides({"epochs": 3, "data": {"batch_size": 8}}, ["data.batch_size=16", "epochs=4", "epochs=6"])
    assert merged["data"]["batch_size"].value == 16 and merged["epochs"].value == 6


@pytest.mark.parametrize(
    ("job", "overrides", "message"),
    [
        ({}, ["epochz=3"], "epochz: unknown key in the top level (did you mean 'epochs'?)"),
        ({}, ["optimizer.lrr=0.1"], "optimizer.lrr: unknown key in [optimizer] (did you mean 'lr'?)"),
        ({}, ["lossx.name=mse"], "unknown section [lossx] (did you mean 'loss'?)"),
        ({}, ["optimizer.lr=fast"], "optimizer.lr: expected float, got 'fast'"),
        ({}, ["epochs=1.5"], "epochs: expected int, got 1.5"),
        ({}, ["epochs=true"], "epochs: expected int, got True"),
        ({}, ["data.shuffle=1"], "data.shuffle: expected bool, got 1"),
        ({}, ["optimizer.betas=0.9"], "optimizer.betas: expected a list, got 0.9"),
        ({}, ["epochs=0"], "epochs: must be >= 1, got 0"),
        ({}, ["grad_accumulation=0"], "grad_accumulation: must be >= 1, got 0"),
        ({}, ["device=tpu"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({}, ["loss.name=mse2"], "loss.name: unknown loss 'mse2' (did you mean 'mse'?)"),
        ({}, ["optimizer.name=adamx"], "optimizer.name: unknown optimizer 'adamx' (did you mean 'adam'?)"),
        ({}, ["model.name=mpl"], "model.name: unknown model 'mpl' (did you mean 'mlp'?)"),
        ({}, ["data.name=clasification"], "data.name: unknown data 'clasification' (did you mean 'classification'?)"),
        ({}, ["scheduler.name=cosin"], "scheduler.name: unknown scheduler 'cosin' (did you mean 'cosine'?)"),
        ({}, ["model.hidden=[8]"], "model.hidden: unknown key in [model]"),  # linear has no hidden layers
        ({}, ["noequals"], "--set 'noequals': expected section.key=value or key=value"),
        ({}, ["a.b.c=1"], "--set 'a.b.c=1': expected section.key=value or key=value"),
        ({"epochs": 3}, ["epochs.x=1"], "--set 'epochs.x=1': 'epochs' is a setting, not a section"),
        ({"loss": {"name": 3}}, [], "loss.name: expected a string, got 3"),
        ({"plugins": "my_losses"}, [], "plugins: expected a list, got 'my_losses'"),
        ({"loss": "mse"}, [], "loss: is a section; set its keys ([loss] or --set loss.KEY=VALUE)"),
    ],
)
def test_bad_settings_are_rejected_naming_the_key(job, overrides, message):
    with pytest.raises(engine.ConfigError) as raised:
        engine.load_config(job, overrides)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_an_unknown_key_without_a_close_match_lists_the_choices():
    with pytest.raises(
        engine.ConfigError, match=r"loss.zzz: unknown key in \[loss\] \(choose one of: name, reduction\)"
    ):
        engine.load_config({"loss": {"zzz": 1}})


def test_a_missing_job_file(tmp_path):
    with pytest.raises(engine.ConfigError, match=r"job file 'nope.toml' does not exist"):
        load_job("nope.toml")


def test_a_malformed_job_file(tmp_path):
    (tmp_path / "bad.toml").write_text("epochs = \n")
    with pytest.raises(engine.ConfigError, match=r"job file 'bad.toml' is not valid TOML: .*line 1"):
        load_job("bad.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(engine.ConfigError, match=r"job file 'binary.toml' cannot be read"):
        load_job("binary.toml")


def test_dump_toml_round_trips_the_resolved_config():
    config, _ = engine.load_config(
        {"model": {"name": "mlp", "hidden": [8, 4]}, "loss": {"name": "cross_entropy", "weight": [1.0, 2.0]}},
        ["data.name=classification", "run_name=2024"],
    )
    text = engine.dump_toml(config)
    again, _ = engine.load_config(tomllib.loads(text))
    assert again.to_dict() == config.to_dict()
    assert 'run_name = "2024"' in text and "hidden = [8, 4]" in text


def test_dump_toml_writes_every_value_type():
    text = engine.dump_toml({"a": True, "b": 1.5, "c": float("inf"), "d": None, "s": {"e": 'q"uote', "f": [1, 2]}})
    assert text == 'a = true\nb = 1.5\nc = inf\n# d = (not set)\n\n[s]\ne = "q\\"uote"\nf = [1, 2]\n'
    assert tomllib.loads(text) == {"a": True, "b": 1.5, "c": float("inf"), "s": {"e": 'q"uote', "f": [1, 2]}}


@dataclass(frozen=True)
class TableSettings:
    table: dict[str, dict[str, Any]] | None = None


class OwnsATable:
    @engine.hookimpl
    def register_settings(self):
        return {"search": TableSettings}


def test_a_table_setting_is_checked_key_by_key_and_written_back_inline():
    job = '[search.table]\n"optimizer.lr" = { log = [0.0001, 0.1] }\nwidth = { choice = [[64], [128, 128]] }\n'
    config, _ = engine.load_config(tomllib.loads(job), plugins=[OwnsATable])
    assert config["search"]["table"] == {
        "optimizer.lr": {"log": [0.0001, 0.1]},
        "width": {"choice": [[64], [128, 128]]},
    }
    text = engine.dump_toml(config)
    assert '[search]\ntable = {"optimizer.lr" = {log = [0.0001, 0.1]}, width = {choice = [[64], [128, 128]]}}' in text
    again, _ = engine.load_config(tomllib.loads(text), plugins=[OwnsATable])
    assert again.to_dict() == config.to_dict()
    with pytest.raises(engine.ConfigError, match=r'^search.table."optimizer.lr": expected a table, got 0.1$'):
        engine.load_config({"search": {"table": {"optimizer.lr": 0.1}}}, plugins=[OwnsATable])
    overridden, _ = engine.load_config(None, ["search.table={ x = { range = [0, 1] } }"], plugins=[OwnsATable])
    assert overridden["search"]["table"] == {"x": {"range": [0, 1]}}


def test_sections_are_read_only_mappings():
    config, _ = engine.load_config()
    assert config["optimizer"]["lr"] == config["optimizer"].get("lr") == 0.01
    assert isinstance(config, engine.Config) and isinstance(config["data"], engine.Section)
    with pytest.raises(TypeError):
        config["data"]["batch_size"] = 3  # type: ignore[index]
    assert not hasattr(config["data"], "batch_size")  # one way to read a key: as a mapping


def test_a_users_component_parameters_become_settings():
    config = resolved({"model": {"name": "tests.helpers:scaled_model", "scale": 2}})
    assert config["model"] == {"output": "", "targets": "", "name": "tests.helpers:scaled_model", "scale": 2.0}
    with pytest.raises(engine.ConfigError, match=r"model.width: unknown key in \[model\]"):
        resolved({"model": {"name": "tests.helpers:scaled_model", "width": 2}})


def test_a_job_file_lists_plugin_modules(tmp_path, write_plugin):
    write_plugin("listed_plugin", "import engine\n\n@engine.hookimpl\ndef on_epoch_end():\n    pass\n")
    (tmp_path / "job.toml").write_text('plugins = ["listed_plugin", "tests.helpers:LossOnly"]\n')
    config, plugins = engine.load_config(tmp_path / "job.toml")
    assert plugins.sources["listed_plugin"] == "--plugin listed_plugin"
    assert plugins.sources["tests.helpers:LossOnly"] == "--plugin tests.helpers:LossOnly"
    assert plugins.component("loss", "sq").plugin == "tests.helpers:LossOnly"
    assert config["plugins"] == ("listed_plugin", "tests.helpers:LossOnly")


@dataclass(frozen=True)
class Averaging:
    decay: Annotated[float, engine.Range(gt=0, lt=1)] = 0.99
    enabled: bool = False


@dataclass(frozen=True)
class SamplerDefault:
    name: str = "plain"


class Owns:
    """A plugin that owns a section of its own and adds a component kind."""

    @engine.hookimpl
    def register_settings(self):
        return {"averaging": Averaging, "sampler": SamplerDefault}

    @engine.hookimpl
    def register_components(self):
        return {"sampler": {"plain": lambda: None, "weighted": lambda power=1.0: None}}


def test_plugins_add_their_own_sections_and_component_kinds():
    config, _ = engine.load_config({"averaging": {"decay": 0.9}}, ["sampler.name=weighted"], plugins=[Owns])
    assert dict(config["averaging"]) == {"decay": 0.9, "enabled": False}
    assert dict(config["sampler"]) == {"name": "weighted", "power": 1.0}
    with pytest.raises(engine.ConfigError, match=r"averaging.decay: must be < 1, got 1.5"):
        engine.load_config({"averaging": {"decay": 1.5}}, plugins=[Owns])
    with pytest.raises(
        engine.ConfigError, match=r"averaging.decai: unknown key in \[averaging\] \(did you mean 'decay'\?\)"
    ):
        engine.load_config({"averaging": {"decai": 0.9}}, plugins=[Owns])
    with pytest.raises(
        engine.ConfigError, match=r"sampler.name: unknown sampler 'weighed' \(did you mean 'weighted'\?\)"
    ):
        engine.load_config({"sampler": {"name": "weighed"}}, plugins=[Owns])
    with pytest.raises(engine.ConfigError, match=r"unknown section \[averaging\]"):
        engine.load_config({"averaging": {"decay": 0.9}})  # without the plugin, nobody owns [averaging]


@dataclass(frozen=True)
class WindowSettings:
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.low >= self.high:
            raise ValueError(f"window.low ({self.low}) must be below window.high ({self.high})")


class ChecksItsSettings:
    @engine.hookimpl
    def register_settings(self):
        return {"window": WindowSettings}


def test_a_settings_class_checks_its_resolved_values_and_the_error_names_section_and_plugin():
    config, _ = engine.load_config({"window": {"low": 0.2}}, plugins=[ChecksItsSettings])
    assert dict(config["window"]) == {"low": 0.2, "high": 1.0}
    with pytest.raises(
        engine.ConfigError,
        match=r"^\[window\] \(plugin 'ChecksItsSettings'\): window.low \(2.0\) must be below window.high \(1.0\)$",
    ):
        engine.load_config(None, ["window.low=2"], plugins=[ChecksItsSettings])


def test_strings_of_any_characters_round_trip_through_toml():
    """A text's vocabulary ([inferred] classes) holds newlines, quotes and characters beyond the BMP."""
    vocabulary = ("\n", " ", '"', "\\", "\x7f", "\x00", "é", "\u2028", "😀", "𝄞", "\\ud83d")
    written = engine.dump_toml({"inferred": {"classes": vocabulary}, "name": 'a "b"\\c'})
    assert tomllib.loads(written) == {"inferred": {"classes": list(vocabulary)}, "name": 'a "b"\\c'}
    assert written.isascii()
