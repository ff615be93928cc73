"""engine/chain.py: the setup chain (engine/hookspecs.py) in its order, what each link receives,
what is resolved once (the hooks bound, the plugins whose feature is off unbound), the seeds, what
the data tells recorded in [inferred], a checkpoint restored into the final objects, and
`rebuild_optimizer`."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine import hookspecs
from engine.chain import record_inferred, resolve_device, seed_everything
from tests.helpers import job


class Chain:
    """Records the setup chain: every component factory of the core's kinds, and every chained hook."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seen: dict[str, object] = {}

    @engine.hookimpl
    def register_components(self):
        def recorded(kind, build):
            def factory(**context):
                self.calls.append(kind)
                self.seen[kind] = context
                return build(**context)

            factory.__signature__ = __import__("inspect").signature(build)
            return factory

        def data(seed, device):
            x = torch.linspace(-1, 1, 20)[:, None]
            return x, 2 * x + 3

        return {
            "distributed": {"chain": recorded("distributed", lambda device: None)},
            "data": {"chain": recorded("data", data)},
            "model": {"chain": recorded("model", lambda info, device: nn.Linear(1, 1))},
            "loss": {"chain": recorded("loss", lambda info, device: nn.functional.mse_loss)},
            "optimizer": {"chain": recorded("optimizer", lambda params: torch.optim.SGD(params, lr=0.1))},
            "precision": {"chain": recorded("precision", lambda device: engine.Precision(device.type))},
            "accelerate": {"chain": recorded("accelerate", lambda trainer: None)},
            "scheduler": {
                "chain": recorded(
                    "scheduler",
                    lambda optimizer, length: engine.Scheduled(torch.optim.lr_scheduler.StepLR(optimizer, 1)),
                )
            },
        }

    @engine.hookimpl
    def build_loaders(self):
        self.calls.append("build_loaders")

    @engine.hookimpl
    def wrap_model(self, model):
        self.calls.append("wrap_model")
        return Wrapped(model)

    @engine.hookimpl
    def wrap_optimizer(self, optimizer):
        self.calls.append("wrap_optimizer")
        self.seen["built optimizer"] = optimizer
        return engine.rebuild_optimizer(optimizer, lr=0.05)

    @engine.hookimpl
    def wrap_step(self, step, trainer):
        self.calls.append("wrap_step")
        self.seen["scheduler's optimizer"] = trainer.scheduler.optimizer
        return step

    @engine.hookimpl
    def on_run_start(self):
        self.calls.append("on_run_start")


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


CHAIN_JOB = job(
    epochs=2,
    **{
        kind: {"name": "chain"}
        for kind in ("distributed", "data", "model", "loss", "optimizer", "precision", "accelerate")
    },
    scheduler={"name": "chain"},
)


def test_the_setup_chain_runs_in_its_declared_order():
    chain = Chain()
    trainer = engine.setup(CHAIN_JOB, plugins=[chain])
    trainer.fit()
    assert chain.calls == list(hookspecs.SETUP_CHAIN)


def test_each_link_receives_what_the_previous_one_produced():
    chain = Chain()
    trainer = engine.setup(CHAIN_JOB, plugins=[chain])
    # The step and validation call the wrapped model; the module as built is what is saved.
    assert isinstance(trainer.model, Wrapped) and trainer.model.inner is trainer.module
    # The scheduler and the step use the optimizer the chain ended with, not the one first built.
    assert trainer.optimizer is chain.seen["scheduler's optimizer"]
    assert trainer.optimizer is not chain.seen["built optimizer"]
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 0.05
    # Each factory got the context of its kind, and the optimizer the built module's parameters.
    assert set(chain.seen["model"]) == {"info", "device"} and set(chain.seen["scheduler"]) == {"optimizer", "length"}
    assert chain.seen["scheduler"]["length"] == engine.RunLength(epochs=2, steps_per_epoch=1, total_steps=2, batches=2)
    assert [p.data_ptr() for p in chain.seen["optimizer"]["params"]] == [
        p.data_ptr() for p in trainer.module.parameters()
    ]
    trainer.fit()
    assert trainer.model.calls == 2


# --- resolved once: the hooks bound, the features that are off ----------------------------------


def test_a_plugin_whose_feature_is_off_has_no_per_step_hook_bound():
    class Off:
        def __init__(self) -> None:
            self.calls: list[str] = []

        @engine.hookimpl
        def skip_per_step(self, trainer):
            return trainer.config["epochs"] == 2  # off in this run

        @engine.hookimpl
        def after_step(self):
            self.calls.append("after_step")

        @engine.hookimpl
        def on_epoch_end(self):
            self.calls.append("on_epoch_end")

        @engine.hookimpl
        def on_run_end(self):
            self.calls.append("on_run_end")  # not per step: called as usual

    off, on = Off(), Off()
    trainer = engine.setup(job(epochs=2), plugins=[off])
    assert "Off" in trainer.off
    trainer.fit()
    assert off.calls == ["on_run_end"]
    engine.run(job(epochs=3, run_name="on"), plugins=[on])
    assert on.calls == ["after_step", "on_epoch_end"] * 3 + ["on_run_end"]


def test_a_per_step_scheduler_steps_before_the_plugins_after_step_and_only_after_a_window():
    rates = []

    class Rate:
        @engine.hookimpl
        def register_components(self):
            def tenth(optimizer):  # a tenth of the rate after each optimizer step
                return engine.Scheduled(torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.1))

            return {"scheduler": {"tenth": tenth}}

        @engine.hookimpl
        def after_step(self, window, trainer):
            rates.append((window.last, trainer.optimizer.param_groups[0]["lr"]))

    engine.run(job(epochs=1, grad_accumulation=2, data={"batch_size": 25}, scheduler={"name": "tenth"}), plugins=[Rate])
    # Four batches, two windows: the rate drops after each window's optimizer step.
    assert [last for last, _ in rates] == [False, True, False, True]
    assert [lr for _, lr in rates] == pytest.approx([0.01, 0.001, 0.001, 0.0001])


def test_a_logging_point_falls_every_tenth_of_the_run_unless_set():
    assert engine.setup(job(epochs=25)).log_every == 2
    assert engine.setup(job(epochs=5)).log_every == 1
    assert engine.setup(job(epochs=25, log={"every": 7})).log_every == 7


# --- seeds, devices, what the data tells --------------------------------------------------------


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())


def test_setup_leaves_the_python_and_numpy_streams_seeded():
    engine.setup(job(seed=7))
    assert random.random() == random.Random(7).random()
    assert np.random.rand() == np.random.RandomState(7).rand()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(engine.ConfigError, match=r"^device: 'cuda:1' asked for, but CUDA is not available"):
            resolve_device("cuda:1")


def test_record_inferred_fills_in_what_the_data_tells_and_refuses_a_mismatch():
    config, _ = engine.load_config()
    info = engine.DataInfo(n_features=3, n_outputs=2, task="binary", n_train=10, threshold=0.7, input_shape=(3,))
    transform = engine.InputTransform("standardize", nn.Identity())
    recorded = record_inferred(config, info, transform)
    assert dict(recorded["inferred"]) == {
        "n_features": 3,
        "n_outputs": 2,
        "task": "binary",
        "threshold": 0.7,
        "input_transform": "standardize",
        "input_shape": (3,),
        "classes": (),
    }
    assert record_inferred(recorded, info, None)["inferred"]["input_transform"] == ""  # what this data fitted
    assert dict(config["inferred"])["task"] == ""  # a new config; the given one is unchanged
    other = engine.DataInfo(n_features=4, n_outputs=2, task="binary", n_train=10)
    with pytest.raises(
        engine.ConfigError, match=r"^inferred.n_features: the job was written for 3, but the data has 4$"
    ):
        record_inferred(recorded, other, None)
    images = engine.DataInfo(n_features=3, n_outputs=2, task="binary", n_train=10, input_shape=(1, 3, 3))
    with pytest.raises(
        engine.ConfigError,
        match=r"^inferred.input_shape: the job was written for \(3,\), but the data has \(1, 3, 3\)$",
    ):
        record_inferred(recorded, images, None)
    named = engine.DataInfo(n_features=3, n_outputs=2, task="binary", n_train=10, classes=("no", "yes"))
    assert record_inferred(config, named, None)["inferred"]["classes"] == ("no", "yes")  # a vocabulary, kept
    with pytest.raises(engine.ConfigError, match=r"^inferred.classes: the job was written for \('no', 'yes'\)"):
        record_inferred(record_inferred(config, named, None), dataclasses.replace(named, classes=("a", "b")), None)


# --- a checkpoint restored, the optimizer rebuilt ----------------------------------------------


def test_a_checkpoint_that_does_not_fit_the_run_is_a_config_error_naming_it(tmp_path):
    result = engine.run(job(epochs=2))
    [checkpoint] = (result.run_dir / "checkpoints").glob("step-*.pt")
    changed = job(model={"name": "mlp", "hidden": [4]})
    with pytest.raises(engine.ConfigError, match=r"other settings: model.name 'linear' -> 'mlp';"):
        engine.setup(changed, resume=result.run_dir)  # engine/resuming.py: not the same run
    with pytest.raises(engine.ConfigError, match=rf"^checkpoint '{checkpoint}' does not fit this run: RuntimeError"):
        engine.setup(changed, resume=result.run_dir, allow_changes=["model"])  # allowed, but the weights cannot
    assert [path.name for path in (result.run_dir / "checkpoints").iterdir()] == [checkpoint.name]


def test_rebuild_optimizer_keeps_the_parameters_and_groups_and_applies_changes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters()}]
    optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.5)
    rebuilt = engine.rebuild_optimizer(optimizer, tensor_lr=True, amsgrad=True)
    assert type(rebuilt) is torch.optim.AdamW and rebuilt is not optimizer
    for old, new in zip(optimizer.param_groups, rebuilt.param_groups):
        assert new["params"] == old["params"] and new["amsgrad"] and new["weight_decay"] == 0.5
        assert isinstance(new["lr"], torch.Tensor) and new["lr"].item() == pytest.approx(old["lr"])
    assert [group["lr"].item() for group in rebuilt.param_groups] == pytest.approx([0.1, 0.01])
