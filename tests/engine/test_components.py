"""engine/components.py: a component built from its config section with the run context it asks
for, what its factory must return, and the ``package.module:name`` references a job may name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from engine.components import CORE_KINDS, OPTIONAL_KINDS, build_component, import_object


class Recording:
    """Provides a model that records what its factory received, and one of each failure."""

    def __init__(self) -> None:
        self.received: list[dict] = []

    @engine.hookimpl
    def register_components(self):
        def recorded(info, width: int = 4, depth: int = 1):
            self.received.append({"info": info, "width": width, "depth": depth})
            return nn.Linear(info.n_features, width)

        def failing(info):
            raise ValueError("no weights file")

        def not_a_module(info):
            return "model"

        return {
            "model": {"recorded": recorded, "failing": failing, "not_a_module": not_a_module},
            "sampler": {"plain": lambda: "plain sampler"},
        }


INFO = engine.DataInfo(n_features=3, n_outputs=1, task="regression", n_train=10)


def built(job: dict, kind: str = "model", name: str | None = None, **context):
    recording = Recording()
    config, plugins = engine.load_config(job, plugins=[recording])
    return build_component(config, plugins, kind, name, **context), recording


def test_the_config_names_the_component_and_its_settings_and_the_factory_takes_the_context_it_asks_for():
    model, recording = built({"model": {"name": "recorded", "width": 6}}, info=INFO, device="unused")
    assert isinstance(model, nn.Linear) and model.out_features == 6
    assert recording.received == [{"info": INFO, "width": 6, "depth": 1}]  # no device: not a parameter of it


def test_a_name_given_builds_that_component_with_its_default_settings():
    model, recording = built({"model": {"name": "linear", "out_features": 3}}, name="recorded", info=INFO)
    assert recording.received == [{"info": INFO, "width": 4, "depth": 1}]  # not the section's settings
    assert model.out_features == 4


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("failing", "model 'failing' (plugin 'Recording') cannot be built: ValueError: no weights file"),
        ("not_a_module", "model 'not_a_module' (plugin 'Recording'): the factory returned a str, not a Module"),
        ("tests.helpers:broken_model", "model 'tests.helpers:broken_model' cannot be built: ValueError: no weights"),
        (
            "tests.helpers:Recorder",
            "model.name: 'tests.helpers:Recorder' is a class but not a torch.nn.modules.module.Module",
        ),
    ],
)
def test_a_factory_that_fails_or_returns_the_wrong_type_is_a_config_error_naming_it(name, message):
    with pytest.raises(engine.ConfigError) as raised:
        built({"model": {"name": name}}, info=INFO)
    assert str(raised.value).startswith(message)


def test_an_optional_kind_with_no_component_chosen_builds_nothing():
    assert set(CORE_KINDS) >= OPTIONAL_KINDS
    config, plugins = engine.load_config(blocked=["schedulers", "precision"])  # no plugin provides them
    assert config["scheduler"]["name"] is None and config["precision"]["name"] is None
    assert build_component(config, plugins, "scheduler", optimizer=None, length=None) is None
    trainer = engine.setup(config, blocked=["schedulers", "precision"])
    assert trainer.scheduler is None and trainer.precision == engine.Precision("cpu")  # full precision
    unchosen, _ = built(None, "sampler")
    assert unchosen is None  # a kind a plugin adds: its section names none
    assert built({"sampler": {"name": "plain"}}, "sampler")[0] == "plain sampler"


def test_a_component_by_reference_imports_it():
    plugins = engine.make_plugins()
    component = plugins.component("model", "tests.helpers:scaled_model")
    assert component.factory.__name__ == "scaled_model" and component.plugin == ""
    with pytest.raises(engine.ConfigError, match=r"model.name: cannot import module 'tests.nope'"):
        plugins.component("model", "tests.nope:factory")
    with pytest.raises(engine.ConfigError, match=r"model.name: module 'tests.helpers' has no attribute 'nope'"):
        plugins.component("model", "tests.helpers:nope")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("os:system", "k: 'os:system' is in the standard library, which provides no components"),
        ("shutil.util:rmtree", "k: 'shutil.util:rmtree' is in the standard library"),
        ("tests.helpers", "k: 'tests.helpers' is not a reference of the form 'package.module:name'"),
        (":scaled_model", "k: ':scaled_model' is not a reference of the form"),
        ("tests.helpers:not-a-name", "k: 'tests.helpers:not-a-name' is not a reference of the form"),
        ("tests.helpers:QUICK", "k: 'tests.helpers:QUICK' is a dict, not a function or class (a component's factory)"),
        # The standard library's, re-exported by a module outside it (torch's imports subprocess.Popen).
        (
            "torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler:Popen",
            "k: 'torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler:Popen' is "
            "subprocess.Popen of the standard library, which provides no components",
        ),
        ("tests.helpers:Path", "k: 'tests.helpers:Path' is pathlib.Path of the standard library"),
    ],
)
def test_import_object_takes_only_functions_and_classes_outside_the_standard_library(reference, message):
    with pytest.raises(engine.ConfigError) as raised:
        import_object(reference, "k")
    assert str(raised.value).startswith(message)


def test_import_object_returns_the_function_or_class():
    from tests import helpers

    assert import_object("tests.helpers:scaled_model", "k") is helpers.scaled_model
    assert import_object("tests.helpers:Pairs", "k") is helpers.Pairs
    assert import_object("torch.nn:Linear", "k") is torch.nn.Linear
