"""engine/saved.py: opening a trained run (`engine.load`): the model rebuilt from its config.toml
behind its input transform, with the weights ``final`` (model.pt), ``last`` or ``best`` name (the
checkpoints a plugin finds), and one-line errors for what is not there."""

from __future__ import annotations

import copy

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
