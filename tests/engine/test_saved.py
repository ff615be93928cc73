"""engine/saved.py: opening a trained run (`engine.load`): the model rebuilt from its config.toml
behind its input transform, with the weights ``final`` (model.pt), ``last`` or ``best`` name (the
checkpoints a plugin finds), one-line errors for what is not there, and a run directory opened as
data: a config that names code is refused unless trusted."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import engine
from engine.types import WithInputTransform
from tests.helpers import job


class Doubled:
    """Ends the run with a copy of the trained module, its weights doubled."""

    @engine.hookimpl
    def final_model(self, module):
        doubled = copy.deepcopy(module)
        with torch.no_grad():
            for parameter in doubled.parameters():
                parameter.mul_(2)
        return doubled


@pytest.fixture
def trained():
    """A run whose data fitted a standardization, ending with doubled weights, with validation
    (so a best checkpoint) and a checkpoint at every step."""
    data = {"standardize": True, "val_fraction": 0.2}
    trainer = engine.setup(job(epochs=3, data=data, checkpoint={"every_steps": 1}), plugins=[Doubled])
    return trainer, trainer.fit()


def test_load_rebuilds_the_final_model_behind_its_input_transform(trained):
    trainer, result = trained
    loaded = engine.load(result.run_dir)
    assert isinstance(loaded, WithInputTransform) and not loaded.training
    assert list(loaded.state_dict()) == ["transform.mean", "transform.std", "model.weight", "model.bias"]
    x = torch.linspace(-3, 3, 7)[:, None]  # raw inputs
    torch.testing.assert_close(loaded(x), result.model(x))
    assert torch.equal(loaded.model.weight, 2 * trainer.module.model.weight)


def test_load_last_and_best_read_the_checkpoints_that_the_checkpoint_plugin_finds(trained):
    trainer, result = trained
    # A checkpoint keeps the trained weights (to resume) and the model validation evaluated (the
    # final_model chain's, not ending): what "last" and "best" open.
    last = engine.load(result.run_dir, which="last")
    assert torch.equal(last.model.weight, 2 * trainer.module.model.weight)
    best = engine.load(result.run_dir, which="best")
    plugins = engine.make_plugins()
    path = plugins.hook.find_checkpoint(run_dir=result.run_dir, which="best")
    saved = engine.runs.load(path, engine.runs.CHECKPOINT_FORMAT)
    assert torch.equal(best.model.weight, saved["evaluated"]["model.weight"])
    assert torch.equal(saved["evaluated"]["model.weight"], 2 * saved["model"]["model.weight"])


def test_model_file_names_the_file_of_each_choice(trained):
    _, result = trained
    plugins = engine.make_plugins()
    run_dir = result.run_dir
    assert engine.model_file(plugins, run_dir, "final") == (run_dir / "model.pt", engine.runs.MODEL_FORMAT)
    path, kind = engine.model_file(plugins, run_dir, "last")
    assert path.name == "step-000000003.pt" and kind == engine.runs.CHECKPOINT_FORMAT
    with pytest.raises(engine.ConfigError, match=r"^which: expected one of 'final', 'best', 'last', got 'first'$"):
        engine.model_file(plugins, run_dir, "first")

    class Listed:
        @engine.hookimpl(tryfirst=True)
        def find_checkpoint(self):
            return ["step-000000003.pt"]

    with pytest.raises(
        engine.ConfigError, match=r"^hook find_checkpoint returned list \['step-000000003.pt'\], not a path$"
    ):
        engine.model_file(engine.make_plugins([Listed]), run_dir, "last")
    without = engine.make_plugins(blocked=["checkpoint"])
    with pytest.raises(engine.ConfigError, match=r"^which = 'best': no plugin finds checkpoints \(find_checkpoint\)"):
        engine.model_file(without, run_dir, "best")


def test_a_run_without_what_is_asked_for_is_a_config_error_saying_so(tmp_path):
    with pytest.raises(engine.ConfigError, match=r"^'nowhere' is not a run directory \(it has no config.toml\)$"):
        engine.load("nowhere")
    (tmp_path / "unstarted").mkdir()
    (tmp_path / "unstarted" / "config.toml").write_text("epochs = 2\n")
    with pytest.raises(engine.ConfigError, match=r"records no \[inferred\] sizes: the run never started$"):
        engine.load(tmp_path / "unstarted")
    result = engine.run(job(epochs=2, data={"val_fraction": 0.2}, checkpoint={"keep_best": 0}))
    with pytest.raises(engine.ConfigError, match=r"^run '.*quick' has no best checkpoint$"):
        engine.load(result.run_dir, which="best")
    (result.run_dir / "model.pt").unlink()  # as a killed run has none
    with pytest.raises(
        engine.ConfigError, match=r"^run '.*quick' has no model.pt: it did not complete or stop cleanly"
    ):
        engine.load(result.run_dir)


def test_weights_that_do_not_fit_the_runs_model_are_a_config_error_naming_the_file(tmp_path):
    result = engine.run(job(epochs=2))
    saved = {"format": engine.runs.MODEL_FORMAT, "model": {"weight": torch.ones(3, 3)}, "step": 2}
    engine.runs.save(saved, result.run_dir / "model.pt")
    with pytest.raises(engine.ConfigError, match=r"^file '.*model.pt' does not fit the model of the run's config.toml"):
        engine.load(result.run_dir)


def test_open_run_reads_the_config_and_what_the_run_inferred(trained):
    _, result = trained
    config, plugins, info = engine.open_run(result.run_dir)
    assert config.to_dict() == result.config.to_dict()
    assert (info.n_features, info.n_outputs, info.task, info.threshold) == (1, 1, "regression", 0.5)
    assert info.input_shape == (1,)  # the tutorial's samples: one feature each
    assert "losses" in plugins.names()


def test_opening_a_run_leaves_the_global_random_streams_as_they_were(trained):
    _, result = trained
    state = torch.get_rng_state()
    engine.load(result.run_dir)  # building the model draws initial weights, then loads the saved ones
    assert torch.equal(torch.get_rng_state(), state)


# --- a run directory is data: opening one imports nothing it names ----------------------------

CANARY = """
from pathlib import Path

import engine

Path({marker!r}).open("a").write("imported\\n")  # what running this file leaves behind


@engine.hookimpl
def on_log(metrics):
    pass
"""


def test_a_run_whose_config_names_a_plugin_file_opens_only_trusted_or_with_the_plugin_given(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    plugin = tmp_path / "canary.py"
    plugin.write_text(CANARY.format(marker=str(marker)))
    result = engine.run(job(epochs=2, plugins=[str(plugin)]))
    assert marker.read_text() == "imported\n"
    marker.unlink()
    for name in [name for name in sys.modules if name.startswith(engine.plugins.PLUGIN_FILE_MODULE)]:
        monkeypatch.delitem(sys.modules, name)  # so that a second import would run the file again
    message = (
        rf"^run '.*quick' names code that opening it would import: plugins\[0\] = '{plugin}'; a run directory "
        r"is data: pass --trust-run \(trust=True\) if you trust it, or give its plugins with --plugin$"
    )
    with pytest.raises(engine.ConfigError, match=message):
        engine.load(result.run_dir)
    with pytest.raises(engine.ConfigError, match=message):
        engine.open_run(result.run_dir)
    with pytest.raises(engine.ConfigError, match=r"^--resume: run '.*quick' names code"):
        engine.setup(resume=result.run_dir)
    assert not marker.exists()  # refused before anything was imported
    torch.testing.assert_close(engine.load(result.run_dir, plugins=[str(plugin)]).weight, result.model.weight)
    assert marker.read_text() == "imported\n"  # given with --plugin: the caller's own
    torch.testing.assert_close(engine.load(result.run_dir, trust=True).weight, result.model.weight)


def test_a_run_whose_config_names_a_component_or_an_input_transform_by_reference_is_refused(tmp_path):
    result = engine.run(job(epochs=2, model={"name": "tests.helpers:scaled_model", "scale": 2.0}))
    with pytest.raises(engine.ConfigError, match=r"would import: model.name = 'tests.helpers:scaled_model'; "):
        engine.load(result.run_dir)
    assert isinstance(engine.load(result.run_dir, trust=True), torch.nn.Module)
    plain = engine.run(job(epochs=2, run_name="plain"))
    config = plain.run_dir / "config.toml"
    config.write_text(config.read_text().replace('input_transform = ""', 'input_transform = "tests.helpers:job"'))
    with pytest.raises(engine.ConfigError, match=r"would import: inferred.input_transform = 'tests.helpers:job'"):
        engine.load(plain.run_dir)  # a component the model is built with, though no section names it


def test_weights_outside_the_run_are_not_read(tmp_path):
    result = engine.run(job(epochs=2))
    (tmp_path / "elsewhere.pt").write_bytes((result.run_dir / "model.pt").read_bytes())
    (result.run_dir / "model.pt").unlink()
    (result.run_dir / "model.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(engine.ConfigError, match=r"^model file '.*quick/model.pt' is outside run '.*quick'$"):
        engine.load(result.run_dir)
