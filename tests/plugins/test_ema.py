"""plugins/ema.py: ``[ema] decay``, an exponential moving average of the weights that validation
evaluates and the run ends with. The oracle is the average computed by hand (``torch.lerp`` on a
copy of the weights after each optimizer step)."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from engine_plugins import inference
from engine_plugins.early_stopping import EarlyStopping
from engine_plugins.ema import WeightAveraging
from torch import nn

import engine
from tests.conftest import REPO

DECAY = 0.9
# 3 batches an epoch (48 training samples in batches of 16), accumulation windows of 2 and 1.
JOB = {
    "epochs": 4,
    "run_name": "ema",
    "grad_accumulation": 2,
    "data": {"name": "classification", "n_samples": 64, "n_features": 6, "batch_size": 16, "val_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [8]},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"lr": 0.05},
    "ema": {"decay": DECAY},
    "log": {"every": 1},
}


class ByHand:
    """The average computed by hand: a copy of the initial weights, lerped toward the trained ones
    after each optimizer step; and each epoch's trained and averaged weights."""

    def __init__(self) -> None:
        self.average: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.epochs: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    @engine.hookimpl
    def on_run_start(self, trainer):
        self.average = {name: value.clone() for name, value in trainer.module.state_dict().items()}

    @engine.hookimpl
    def after_step(self, window, trainer):
        if window.last:  # the optimizer stepped
            self.steps += 1
            for name, weight in trainer.module.state_dict().items():
                self.average[name] = torch.lerp(self.average[name], weight, 1 - DECAY)

    @engine.hookimpl
    def on_epoch_end(self, epoch, trainer):
        trained = {name: value.clone() for name, value in trainer.module.state_dict().items()}
        self.epochs[epoch] = {"trained": trained, "average": dict(self.average)}


def same(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return weights.keys() == expected.keys() and all(torch.equal(weights[name], expected[name]) for name in weights)


@pytest.fixture(scope="module")
def averaged(tmp_path_factory) -> tuple[engine.Trainer, engine.Result, ByHand]:
    """The job trained once, with the average by hand beside it."""
    runs_dir = tmp_path_factory.mktemp("runs")
    by_hand = ByHand()
    trainer = engine.setup({**JOB, "runs_dir": str(runs_dir)}, plugins=[by_hand])
    return trainer, trainer.fit(), by_hand


def test_the_average_is_the_ema_of_the_weights_after_each_optimizer_step(averaged):
    trainer, result, by_hand = averaged
    assert by_hand.steps == 4 * 2  # two windows an epoch: the average moves once per window
    assert same(result.model.state_dict(), by_hand.average)
    assert result.model is trainer.final_module is not trainer.module  # the run ends with the average
    assert not same(trainer.module.state_dict(), by_hand.average)  # the trained weights stay as trained


def test_validation_evaluates_the_average(averaged):
    trainer, result, by_hand = averaged
    x, y = trainer.loaders.val_data
    model = copy.deepcopy(trainer.module).eval()
    with torch.inference_mode():
        model.load_state_dict(by_hand.epochs[4]["average"])
        expected = nn.functional.cross_entropy(model(x), y).item()
        model.load_state_dict(by_hand.epochs[4]["trained"])
        trained = nn.functional.cross_entropy(model(x), y).item()
    assert result.metrics["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert result.metrics["val_loss"] != pytest.approx(trained, rel=1e-3)  # not the trained weights'


def test_model_pt_engine_load_and_export_hold_the_average(averaged):
    _, result, by_hand = averaged
    assert same(torch.load(result.run_dir / "model.pt", weights_only=True)["model"], by_hand.average)
    loaded = engine.load(result.run_dir)
    assert same(loaded.state_dict(), by_hand.average)
    # The checkpoint keeps the trained weights (what the optimizer's state goes with, and a resume
    # continues) and the average, which validation ranked: what which = "last" opens.
    last = engine.load(result.run_dir, which="last")
    assert same(last.state_dict(), by_hand.epochs[4]["average"])
    saved = torch.load(sorted((result.run_dir / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    assert same(saved["model"], by_hand.epochs[4]["trained"]) and same(saved["evaluated"], by_hand.epochs[4]["average"])
    written = inference.export(result.run_dir, "exported", out="average.pt2")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(torch.export.load(written.path).module()(x), loaded(x), rtol=0, atol=1e-6)


def test_off_by_default_and_then_never_called():
    off = engine.setup({**JOB, "ema": {}})
    assert off.config["ema"]["decay"] == 0.0 and "ema" in off.off
    assert off.model is off.module  # nothing wraps the model
    result = off.fit()
    assert result.model is off.module
    with pytest.raises(engine.ConfigError, match=r"^ema.decay: must be < 1, got 1.0"):
        engine.load_config({**JOB, "ema": {"decay": 1.0}})


class Averages:
    """The average and the validation loss at each epoch's end, read from the plugin that keeps it."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    @engine.hookimpl
    def on_epoch_end(self, epoch, state, trainer):
        [plugin] = [p for p in trainer.plugins.pm.get_plugins() if isinstance(p, WeightAveraging)]
        average = {name: value.clone() for name, value in plugin.average.state_dict().items()}
        self.by_epoch[epoch] = (state.val_metrics["val_loss"], average)


# Overfits: the best validation loss comes long before the end.
OVERFIT = {
    **JOB,
    "epochs": 20,
    "grad_accumulation": 1,
    "data": {"name": "classification", "n_samples": 80, "n_features": 20, "batch_size": 16, "val_fraction": 0.5},
    "model": {"name": "mlp", "hidden": [64]},
    "optimizer": {"lr": 0.02},
    "ema": {"decay": 0.5},
    "early_stopping": {"patience": 50, "restore_best": True},
}


@pytest.mark.parametrize("first", [WeightAveraging, EarlyStopping])
def test_the_final_model_is_the_same_whichever_order_the_plugins_are_registered_in(first):
    seen = Averages()
    ours = [WeightAveraging(), EarlyStopping()]
    ours.sort(key=lambda plugin: not isinstance(plugin, first))  # pluggy calls the later-registered first
    job = {**OVERFIT, "run_name": first.__name__}
    trainer = engine.setup(job, plugins=[seen, *ours], blocked=["ema", "early_stopping"])
    chain = [trainer.plugins.pm.get_plugin(name) for name, _ in trainer.plugins.bind_by_plugin("final_model")]
    assert [type(plugin) for plugin in chain] == [type(plugin) for plugin in reversed(ours)]
    result = trainer.fit()
    # With early stopping (restore_best), the run ends with the best epoch's average.
    losses = {epoch: loss for epoch, (loss, _) in seen.by_epoch.items()}
    best = min(losses, key=losses.get)
    assert best < OVERFIT["epochs"]
    assert same(result.model.state_dict(), seen.by_epoch[best][1])
    assert same(engine.load(result.run_dir).state_dict(), seen.by_epoch[best][1])


# --- resume -------------------------------------------------------------------------------------------

# Kills its own process with SIGKILL after step $KILL_AT; a no-op without it.
KILLER = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state):
    if state.step == int(os.environ.get("KILL_AT", 0)):
        time.sleep(0.2)  # the background writer puts the last checkpoint on disk
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_run_killed_at_a_random_step_resumes_to_the_same_average_bit_for_bit(tmp_path, monkeypatch):
    job = {**JOB, "epochs": 6, "plugins": ["killer.py"], "checkpoint": {"every_steps": 2}}
    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "job.toml").write_text(engine.dump_toml(job))
    monkeypatch.syspath_prepend(str(REPO))
    whole = engine.run(tmp_path / "job.toml", overrides=["run_name=whole"])
    kill_at = random.Random("ema").randrange(3, 6 * 3)  # after the first checkpoint, before the end
    environment = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": str(kill_at)}
    killed = subprocess.run(
        [sys.executable, "-m", "engine", "run", "job.toml", "--set", "run_name=killed"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    saved = engine.runs.load(sorted((run_dir / "checkpoints").glob("step-*"))[-1], engine.runs.CHECKPOINT_FORMAT)
    assert "ema" in saved["plugins"]
    resumed = engine.run(resume=run_dir, trust=True)  # its job's plugin file is ours
    assert same(resumed.model.state_dict(), whole.model.state_dict())
    assert same(torch.load(run_dir / "model.pt", weights_only=True)["model"], whole.model.state_dict())
    whole_lines = [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    lines = [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines == whole_lines  # the validation figures are the average's, restored with it
