"""The setup chain (engine/hookspecs.py): its order, what each link receives, pluggy's wrappers on
every hook, and the checks that no plugin can switch off (the NaN guard)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import engine
from engine import hookspecs
from tests.helpers import job

MARKER = f"{hookspecs.PROJECT}_spec"
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, MARKER))


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
    assert chain.seen["scheduler"]["length"] == engine.RunLength(epochs=2, steps_per_epoch=1)
    assert [p.data_ptr() for p in chain.seen["optimizer"]["params"]] == [
        p.data_ptr() for p in trainer.module.parameters()
    ]
    trainer.fit()
    assert trainer.model.calls == 2


def test_the_plugins_command_shows_the_chain(capsys):
    from engine.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("setup chain"))
    chain = [line.split(":")[0].strip() for line in out[start + 1 : start + 1 + len(hookspecs.SETUP_CHAIN)]]
    assert chain == list(hookspecs.SETUP_CHAIN)


# --- pluggy's wrappers on every hook ----------------------------------------------------------


def wrapper_plugin(hook: str, style: str) -> type:
    """A plugin class whose only implementation is a wrapper (new or old style) of `hook`."""
    log: list[str] = []

    if style == "wrapper":

        def implementation(self):
            log.append(hook)
            return (yield)

        marker = engine.hookimpl(wrapper=True)
    else:

        def implementation(self):
            log.append(hook)
            yield

        marker = engine.hookimpl(hookwrapper=True)
    return type(f"Wraps_{hook}", (), {hook: marker(implementation), "log": log})


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
@pytest.mark.parametrize("hook", HOOKS)
def test_a_wrapper_on_any_hook_works_or_is_refused_at_registration(hook, style):
    plugin = wrapper_plugin(hook, style)
    if hook in hookspecs.ONE_BY_ONE:
        with pytest.raises(engine.ConfigError) as raised:
            engine.make_plugins([plugin])
        assert str(raised.value).startswith(f"plugin 'Wraps_{hook}': hook {hook} is called ")
        assert str(raised.value).endswith("by the engine and takes no wrapper")
        return
    result = engine.run(job(epochs=2, data={"val_fraction": 0.2}), plugins=[plugin])
    assert plugin.log and set(plugin.log) == {hook}
    assert math.isfinite(result.metrics["loss"])


def test_a_refused_wrapper_is_exit_2_with_one_line_from_the_command(tmp_path):
    (tmp_path / "wraps_step.py").write_text(
        "import engine\n\n@engine.hookimpl(wrapper=True)\ndef wrap_step():\n    return (yield)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--plugin", "wraps_step.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "error: plugin 'wraps_step': hook wrap_step is called one implementation at a time by the engine "
        "and takes no wrapper\n"
    )
    assert not (tmp_path / "runs").exists()


def test_every_hook_is_either_dispatched_by_pluggy_or_listed_as_one_by_one():
    dispatched = {"build_loaders", "on_run_start", "on_log"}
    assert set(HOOKS) == set(hookspecs.ONE_BY_ONE) | dispatched
    assert not dispatched & hookspecs.ONE_BY_ONE


# --- what no plugin can switch off ------------------------------------------------------------


class NaNLoss:
    @engine.hookimpl
    def compute_loss(self, output):
        return {"poison": output.sum() * float("nan")}


@pytest.mark.parametrize("blocked", [[], ["console"], ["console", "progress", "run_files"]])
def test_the_nan_guard_stays_when_loggers_are_blocked(blocked):
    with pytest.raises(engine.TrainingError, match=r"non-finite loss \(nan\) in term 'poison' at epoch 1, step 1"):
        engine.run(job(epochs=3, log={"every": 3}), plugins=[NaNLoss], blocked=blocked)


def test_a_non_finite_validation_loss_is_reported_at_its_epoch():
    class NaNValidation:
        @engine.hookimpl
        def compute_loss(self, output, trainer):
            if not trainer.model.training:
                return {"poison": output.sum() * float("inf")}
            return None

    with pytest.raises(engine.TrainingError, match=r"non-finite val_loss \(inf\) at epoch 1; training stopped"):
        engine.run(job(epochs=3, data={"val_fraction": 0.2}), plugins=[NaNValidation])
