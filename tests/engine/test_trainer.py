"""engine/trainer.py: the loop against the hand-written PyTorch loop, hook order, validation mode,
gradient accumulation, the logging points and their checks, the end of a run (the `final_model`
chain), checkpoints and the plugins' state in them, and `engine.run` and `engine.setup` from Python."""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import io
import itertools
import textwrap
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import engine
from engine.steps import clock_of, run_length
from tests.helpers import (
    QUICK,
    LossOnly,
    Recorder,
    classification_data,
    epoch_order,
    job,
    rewind,
    tutorial_data,
    tutorial_loop,
)


class Logged:
    """Keeps what each logging point passes to `on_log`."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    @engine.hookimpl
    def on_log(self, metrics):
        self.metrics.append(dict(metrics))


# --- the oracle ----------------------------------------------------------------------------------


def test_default_job_matches_the_hand_written_tutorial_loop():
    expected_loss, expected_model = tutorial_loop(1000)

    result = engine.run(blocked=["console"])

    assert result.metrics["epoch"] == 1000 and result.metrics["step"] == 1000
    assert round(result.metrics["loss"], 4) == round(expected_loss, 4)
    assert result.metrics["loss"] == pytest.approx(expected_loss, abs=1e-6)
    w, b = result.model.weight.item(), result.model.bias.item()
    assert w == pytest.approx(expected_model.weight.item(), abs=1e-5)
    assert b == pytest.approx(expected_model.bias.item(), abs=1e-5)
    assert abs(w - 2) < 0.05 and abs(b - 3) < 0.05


def test_mlp_classification_with_minibatches_matches_a_hand_written_loop():
    seed, epochs, batch_size, lr = 3, 4, 32, 0.005
    n, features, classes = 200, 6, 3
    x, y = classification_data(seed, n, features, classes, 2.0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        order = epoch_order(seed, epoch, n)
        xs, ys = x[order], y[order]
        losses = []
        for start in range(0, n, batch_size):
            loss = nn.functional.cross_entropy(model(xs[start : start + batch_size]), ys[start : start + batch_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))

    logged = Logged()
    result = engine.run(
        {
            "seed": seed,
            "epochs": epochs,
            "log": {"every": 1},
            "data": {
                "name": "classification",
                "n_samples": n,
                "n_features": features,
                "n_classes": classes,
                "separation": 2.0,
                "batch_size": batch_size,
            },
            "model": {"name": "mlp", "hidden": [16], "activation": "tanh"},
            "loss": {"name": "cross_entropy"},
            "optimizer": {"lr": lr},
            "run_name": "mlp",
        },
        plugins=[logged],
    )

    assert [line["loss"] for line in logged.metrics] == pytest.approx(epoch_losses, abs=1e-5)
    assert result.state.step == epochs * 7  # ceil(200 / 32) batches per epoch
    for mine, theirs in zip(result.model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


# --- hook order ----------------------------------------------------------------------------------


def test_hooks_run_in_the_documented_order():
    recorder = Recorder()
    engine.run(
        job(
            epochs=2,
            val_every=2,
            log={"every": 1},
            data={"n_samples": 40, "batch_size": 16, "val_fraction": 0.25},
        ),
        plugins=[recorder],
    )
    step = ["before_forward", "compute_loss", "compute_metrics", "before_optimizer_step", "after_step"]
    validation = ["before_forward", "compute_loss", "compute_metrics"]
    # The setup chain's check runs a sample as validation does; 30 training samples in batches of
    # 16: 2 steps; 10 validation samples: one batch, epoch 2 only.
    expected = [
        *validation,
        "on_run_start",
        *step * 2,
        "on_log",
        "on_epoch_end",
        *step * 2,
        *validation,
        "on_log",
        "on_epoch_end",
        "on_run_end",
    ]
    assert recorder.calls == expected


def test_validation_runs_in_eval_and_inference_mode_then_training_resumes():
    recorder = Recorder()
    engine.run(
        job(
            epochs=2,
            data={"n_samples": 40, "batch_size": 20, "val_fraction": 0.25},
            model={"name": "mlp", "hidden": [4], "dropout": 0.5},
        ),
        plugins=[recorder],
    )
    training = [(training, inference) for hook, training, inference in recorder.modes if hook == "before_forward"]
    metrics = [(training, inference) for hook, training, inference in recorder.modes if hook == "compute_metrics"]
    # The setup chain's check, as validation; then per epoch: two training batches (train mode,
    # autograd on), then one validation batch.
    assert training == [(False, True)] + [(True, False), (True, False), (False, True)] * 2
    assert metrics == [(False, True)] + [(True, False), (True, False), (False, True)] * 2  # train metrics in the step
    assert [mode for hook, *mode in recorder.modes if hook == "on_epoch_end"] == [[True, False]] * 2


def test_validation_loss_is_the_mean_over_the_whole_validation_set():
    """Uneven validation batches (4, 4, 2) are weighted by size."""
    trainer = engine.setup(job(epochs=1, data={"n_samples": 50, "batch_size": 4, "val_fraction": 0.2}))
    result = trainer.fit()
    x, y = trainer.loaders.val_data
    assert len(x) == 10
    with torch.no_grad():
        expected = nn.functional.mse_loss(result.model(x), y).item()
    assert result.metrics["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["val_mse"] == pytest.approx(expected, rel=1e-5)


# --- gradient accumulation -----------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch():
    base = {"epochs": 5, "data": {"shuffle": False}, "optimizer": {"name": "sgd", "lr": 0.1}}
    big = engine.run({**base, "run_name": "big", "data": {"shuffle": False, "batch_size": 100}})
    accumulated = engine.run(
        {**base, "run_name": "acc", "grad_accumulation": 4, "data": {"shuffle": False, "batch_size": 25}}
    )
    for a, b in zip(big.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert accumulated.state.step == 20  # steps count batches, not optimizer steps


def test_gradient_accumulation_steps_the_optimizer_once_per_window():
    recorder = Recorder()
    # 5 batches per epoch, windows of 2: [0, 1], [2, 3], [4] -> 3 optimizer steps per epoch.
    engine.run(job(epochs=2, grad_accumulation=2, data={"n_samples": 50, "batch_size": 10}), plugins=[recorder])
    per_epoch = recorder.calls[: recorder.calls.index("on_epoch_end")]
    assert per_epoch.count("after_step") == 5
    assert per_epoch.count("before_optimizer_step") == 3
    steps = [call for call in per_epoch if call in ("after_step", "before_optimizer_step")]
    assert steps == [
        "after_step",
        "before_optimizer_step",
        "after_step",
        "after_step",
        "before_optimizer_step",
        "after_step",
        "before_optimizer_step",
        "after_step",
    ]


# --- loss terms ----------------------------------------------------------------------------------


class L2:
    @engine.hookimpl
    def compute_loss(self, trainer):
        return {"l2": 0.1 * sum((p**2).sum() for p in trainer.model.parameters())}


def test_extra_loss_terms_are_summed_and_logged_by_name():
    logged = Logged()
    result = engine.run(job(epochs=2, log={"every": 1}), plugins=[L2, logged])
    assert [line["epoch"] for line in logged.metrics] == [1, 2]
    for line in logged.metrics:
        assert set(line) == {"epoch", "step", "loss", "mse", "l2", "lr"}
        assert line["l2"] > 0 and line["loss"] == pytest.approx(line["mse"] + line["l2"], rel=1e-6)
    assert result.metrics == logged.metrics[-1]


def test_the_optimized_loss_is_the_sum_of_the_terms():
    result = engine.run(job(epochs=5, optimizer={"name": "sgd", "lr": 0.05}), plugins=[L2])
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), y) + 0.1 * sum((p**2).sum() for p in model.parameters())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(result.model.weight, model.weight)
    torch.testing.assert_close(result.model.bias, model.bias)


class Twice:
    @engine.hookimpl
    def compute_loss(self, output):
        return {"mse": output.mean()}


def test_two_loss_terms_with_one_name_are_an_error(tmp_path):
    with pytest.raises(engine.ConfigError) as raised:
        engine.run(job(), plugins=[Twice])
    assert str(raised.value) == "plugin 'Twice': hook compute_loss returned a second loss term named 'mse'"
    assert not (tmp_path / "runs").exists()


# --- the step and the state ----------------------------------------------------------------------


class CountingWrapper:
    def __init__(self) -> None:
        self.calls = 0

    @engine.hookimpl
    def wrap_step(self, step, trainer):
        def wrapped(batch, window):
            self.calls += 1
            return step(batch, window)

        return wrapped


def test_wrap_step_wraps_the_whole_step_once():
    wrapper = CountingWrapper()
    plain = engine.run(job(epochs=4, run_name="plain"))
    wrapped = engine.run(job(epochs=4, run_name="wrapped"), plugins=[wrapper])
    assert wrapper.calls == 4
    assert wrapped.metrics["loss"] == plain.metrics["loss"]


def test_the_same_seed_gives_the_same_model_and_another_seed_another():
    a = engine.run(job(seed=1, run_name="a", data={"batch_size": 10}))
    b = engine.run(job(seed=1, run_name="b", data={"batch_size": 10}))
    c = engine.run(job(seed=2, run_name="c", data={"batch_size": 10}))
    assert a.metrics["loss"] == b.metrics["loss"]
    assert torch.equal(a.model.weight, b.model.weight)
    assert a.metrics["loss"] != c.metrics["loss"]


def test_a_stop_request_ends_the_run_after_the_epoch():
    class StopAtTwo:
        @engine.hookimpl
        def on_epoch_end(self, epoch, state):
            state.stop = epoch == 2

    result = engine.run(job(epochs=10), plugins=[StopAtTwo()])
    assert result.state.step == 2
    assert result.metrics["epoch"] == 2  # the stopping epoch is logged


# --- engine.run from Python ----------------------------------------------------------------------


def test_run_accepts_a_dict_a_toml_path_and_a_config(tmp_path):
    from_dict = engine.run(job(run_name="dict"))
    (tmp_path / "job.toml").write_text('epochs = 3\nrun_name = "toml"\n')
    from_path = engine.run(tmp_path / "job.toml")
    from_str = engine.run(str(tmp_path / "job.toml"), overrides=["run_name=str"])
    config, _ = engine.load_config(job(run_name="config"))
    from_config = engine.run(config)
    losses = {r.metrics["loss"] for r in (from_dict, from_path, from_str, from_config)}
    assert len(losses) == 1
    assert [r.run_dir.name for r in (from_dict, from_path, from_str, from_config)] == ["dict", "toml", "str", "config"]
    assert isinstance(from_config.model, nn.Linear)
    assert from_config.config["data"]["batch_size"] == 0


def test_run_takes_extra_plugin_objects_and_many_runs_share_nothing():
    recorders = [Recorder(), Recorder()]
    results = [engine.run(job(run_name=f"r{i}"), plugins=[r]) for i, r in enumerate(recorders)]
    assert recorders[0].calls == recorders[1].calls and recorders[0].calls.count("after_step") == 3
    assert results[0].metrics == results[1].metrics
    # A plugin class is instantiated per run: the metrics_file plugin starts empty each time.
    first = engine.setup(job()).plugins.pm.get_plugin("metrics_file")
    second = engine.setup(job()).plugins.pm.get_plugin("metrics_file")
    assert first is not None and second is not None and first is not second


def test_plugins_passed_to_run_can_replace_a_blocked_built_in():
    result = engine.run(job(loss={"name": "sq"}), plugins=[LossOnly], blocked=["losses"])
    assert "sq" in result.metrics and result.metrics["loss"] == result.metrics["sq"]
    assert result.metrics["loss"] == pytest.approx(engine.run(job(run_name="mse")).metrics["loss"], rel=1e-6)


def test_without_the_loss_plugin_a_loss_name_is_required():
    with pytest.raises(engine.ConfigError, match=r"loss\.name: required.*choose one of: sq"):
        engine.run(job(), plugins=[LossOnly], blocked=["losses"])


def test_result_holds_the_final_metrics_and_run_dir(tmp_path):
    result = engine.run(QUICK)
    assert result.run_dir.resolve() == tmp_path / "runs" / "quick"
    assert set(result.metrics) == {"epoch", "step", "loss", "mse", "lr"}
    assert result.state.epoch == 4 and result.state.step == 3


# --- failures name the plugin and hook -----------------------------------------------------------


class Quiet:
    @engine.hookimpl
    def on_epoch_end(self):
        pass

    @engine.hookimpl
    def on_run_start(self):
        pass


def exploding(hook: str, at_step: int = 2):
    """A plugin class whose `hook` raises once the run reaches step `at_step`."""

    def implementation(self, trainer):
        if hook == "on_run_start" or trainer.state.step >= at_step:
            raise RuntimeError("boom")

    return type("Exploding", (), {hook: engine.hookimpl(implementation)})


@pytest.mark.parametrize(
    ("hook", "where"),
    [
        ("on_run_start", "at the start of the run"),
        ("before_forward", "epoch 1, step 2"),
        ("compute_loss", "epoch 1, step 2"),
        ("before_optimizer_step", "epoch 1, step 2"),
        ("after_step", "epoch 1, step 2"),
        ("on_epoch_end", "end of epoch 1, step 2"),
    ],
)
def test_an_exception_in_a_hook_names_plugin_hook_epoch_and_step(hook, where):
    # Quiet comes from this module too: the blame must still name the plugin that raised.
    with pytest.raises(engine.TrainingError) as raised:
        engine.run(job(epochs=3, data={"batch_size": 50}), plugins=[exploding(hook), Quiet])
    assert str(raised.value) == f"{where}: plugin 'Exploding' failed in hook {hook}: RuntimeError: boom"
    assert isinstance(raised.value.__cause__, RuntimeError)


# --- resuming from the state object --------------------------------------------------------------


def test_a_run_resumed_from_its_state_mid_epoch_ends_exactly_like_an_uninterrupted_one(tmp_path):
    """Through the real path: a checkpoint taken mid-epoch, restored by the setup chain (model,
    optimizer, loop state with every RNG), and the loop continuing at its position."""
    resumable = job(
        epochs=3,
        data={"batch_size": 25},
        model={"name": "mlp", "hidden": [8], "dropout": 0.2},  # dropout draws from the torch RNG
        optimizer={"name": "adamw"},
        checkpoint={"every_steps": 2, "keep_last": 9},
    )
    whole = engine.run({**resumable, "run_name": "whole"})
    rewound = rewind(whole.run_dir, 6, tmp_path / "rewound")  # epoch 2, after its second batch of four
    trainer = engine.setup(resume=rewound)
    assert (trainer.state.epoch, trainer.state.batch, trainer.state.step) == (2, 2, 6)
    resumed = trainer.fit()
    assert resumed.state.step == whole.state.step == 12
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


# --- validation cadence and host-device syncs ----------------------------------------------------


def test_validation_runs_every_val_every_epochs_and_at_the_end():
    recorder = Recorder()
    engine.run(job(epochs=5, val_every=2, data={"val_fraction": 0.2}), plugins=[recorder])
    epochs, validated = 1, []
    modes = iter(mode for mode in recorder.modes if mode[0] == "compute_metrics")
    next(modes)  # the setup chain's check
    for call in recorder.calls[recorder.calls.index("on_run_start") :]:  # after the setup chain's check
        if call == "compute_metrics" and not next(modes)[1]:  # in eval mode: validation
            validated.append(epochs)
        elif call == "on_epoch_end":
            epochs += 1
    assert validated == [2, 4, 5]


def test_the_step_never_reads_a_tensor_back_to_the_host(monkeypatch):
    """Only the logging point syncs: one `tolist` for all the losses of the logging period."""
    reads: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    trainer = engine.setup(
        job(epochs=6, log={"every": 6}, data={"batch_size": 10}, model={"name": "mlp", "hidden": [4]}),
        blocked=["console"],
    )
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    trainer.fit()
    monkeypatch.undo()
    assert reads == ["tolist"]  # the metrics plugin's one read, at the only logging point (epoch 6)


# --- the checks at a logging point, which no plugin can switch off -------------------------------


class NaNLoss:
    @engine.hookimpl
    def compute_loss(self, output):
        return {"poison": output.sum() * float("nan")}


@pytest.mark.parametrize("blocked", [[], ["console"], ["console", "progress", "metrics_file"]])
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


# --- the loop: what it calls, in one screen --------------------------------------------------------


class Numbered:
    """Loaders whose batches are named by (epoch, position); `batches` None: an endless stream."""

    def __init__(self, batches: int | None) -> None:
        self.batches = batches

    def train(self, epoch: int, start: int = 0):
        if self.batches is None:
            return ((epoch, position) for position in itertools.count(start))
        return iter([(epoch, position) for position in range(start, self.batches)])


def stub(
    epochs: int | None = 2,
    batches: int | None = 3,
    accumulation: int = 2,
    state: engine.State | None = None,
    max_steps: int | None = None,
    val_every: int = 2,
    val_every_steps: int = 0,
    log_every_steps: int = 0,
):
    """What `Trainer.loop` and the ends of its epochs and intervals read of a trainer, recording
    what they call: the step, the after_step hooks, validation (every `val_every` epochs, every
    `val_every_steps` optimizer steps), the logging point (every epoch, every `log_every_steps`),
    the epoch scheduler, and the on_epoch_end and on_interval_end hooks."""
    calls: list[tuple] = []

    def train_step(batch, window):
        calls.append(("train_step", batch, window))
        return torch.tensor(float(len(calls))), {}

    def validate():
        calls.append(("validate",))
        return {"val_loss": 1.0}

    clock = clock_of([1.0] * (batches or 1), batches, accumulation)
    trainer = SimpleNamespace(
        state=state or engine.State(),
        model=nn.Linear(1, 1).eval(),
        loaders=Numbered(batches),
        batches_per_epoch=batches,
        clock=clock,
        last_step=run_length(clock, epochs, max_steps).batches,
        train_step=train_step,
        after_step=[lambda loss, terms, window: calls.append(("after_step", window))],
        epoch_end=[lambda epoch: calls.append(("on_epoch_end", epoch))],
        interval_end=[lambda step: calls.append(("on_interval_end", step))],
        interrupted=0,
        rank=0,
        distributed=engine.OneProcess(torch.device("cpu")),
        has_validation=True,
        val_every=val_every,
        log_every=1 if batches else 0,
        val_every_steps=val_every_steps,
        log_every_steps=log_every_steps,
        validate=validate,
        log=lambda: calls.append(("log",)),
        epoch_scheduler=lambda: calls.append(("epoch_scheduler",)),
    )
    for method in ("end_epoch", "end_interval", "measure", "plan", "stop_if_asked"):
        setattr(trainer, method, functools.partial(getattr(engine.Trainer, method), trainer))
    trainer.plan()
    return trainer, calls


def epoch_calls(epoch: int, windows: tuple[engine.Window, ...], start: int = 0, validated: bool = False) -> list:
    """What the loop calls for `epoch`, from batch position `start`, as `stub` records it."""
    calls: list[tuple] = []
    for position in range(start, len(windows)):
        calls += [("train_step", (epoch, position), windows[position]), ("after_step", windows[position])]
    calls += [("validate",)] if validated else []
    return [*calls, ("log",), ("epoch_scheduler",), ("on_epoch_end", epoch)]


def step_calls(epoch: int, positions: range, windows) -> list:
    """The step and after_step of each batch position of `epoch`, as `stub` records them."""
    calls: list[tuple] = []
    for position in positions:
        window = windows[position % len(windows)]
        calls += [("train_step", (epoch, position), window), ("after_step", window)]
    return calls


def test_the_loop_runs_each_batch_through_the_step_and_after_step_then_ends_the_epoch():
    trainer, calls = stub()
    engine.Trainer.loop(trainer)
    windows = trainer.clock.period
    assert windows == (engine.Window(True, False, 0.5), engine.Window(False, True, 0.5), engine.Window(True, True, 1.0))
    assert calls == [*epoch_calls(1, windows), *epoch_calls(2, windows, validated=True)]
    state = trainer.state
    assert (state.epoch, state.batch, state.step) == (3, 0, 6)
    assert [(epoch, step) for epoch, step, *_ in state.losses] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert (state.val_metrics, state.val_step) == ({"val_loss": 1.0}, 6)
    assert trainer.model.training  # validation's eval mode ends when training goes on


def test_the_loop_continues_a_resumed_epoch_from_its_position_and_window():
    trainer, calls = stub(state=engine.State(epoch=2, batch=1, step=4))
    engine.Trainer.loop(trainer)
    assert calls == epoch_calls(2, trainer.clock.period, start=1, validated=True)
    assert (trainer.state.epoch, trainer.state.step) == (3, 6)


def test_a_run_counted_in_steps_ends_within_an_epoch_at_its_last_optimizer_step():
    # 3 batches an epoch in windows of 2 and 1: 2 optimizer steps an epoch; 3 steps end after batch 5.
    trainer, calls = stub(epochs=None, max_steps=3, val_every=0)
    engine.Trainer.loop(trainer)
    windows = trainer.clock.period
    assert calls == [
        *epoch_calls(1, windows),
        *step_calls(2, range(2), windows),
        ("validate",),  # the run's last step: validation and the logging point, then the interval's end
        ("log",),
        ("on_interval_end", 5),
    ]
    assert (trainer.state.epoch, trainer.state.batch, trainer.state.step) == (2, 2, 5)


def test_epochs_and_max_steps_whichever_ends_first():
    trainer, calls = stub(epochs=1, max_steps=30)
    engine.Trainer.loop(trainer)
    assert calls == epoch_calls(1, trainer.clock.period, validated=True) and trainer.state.step == 3


def test_points_counted_in_steps_fall_at_the_end_of_their_window_within_and_at_the_end_of_epochs():
    # Validation every 3 optimizer steps (batches 5, 9), logging every 2 (batches 3, 6, 9, 12):
    # those at an epoch's end (3, 6, 9, 12) are the epoch's, the others an interval's.
    trainer, calls = stub(epochs=4, val_every=0, val_every_steps=3, log_every_steps=2)
    trainer.log_every = 0
    engine.Trainer.loop(trainer)
    points = [call for call in calls if call[0] not in ("train_step", "after_step")]
    epoch_end = [("epoch_scheduler",)]
    assert points == [
        *[("log",), *epoch_end, ("on_epoch_end", 1)],
        *[("validate",), ("on_interval_end", 5)],
        *[("log",), *epoch_end, ("on_epoch_end", 2)],
        *[("validate",), ("log",), *epoch_end, ("on_epoch_end", 3)],
        *[("validate",), ("log",), *epoch_end, ("on_epoch_end", 4)],  # the last step: both
    ]


def test_an_endless_stream_runs_one_epoch_until_max_steps_with_its_points_counted_in_steps():
    trainer, calls = stub(epochs=None, batches=None, accumulation=2, max_steps=4, val_every_steps=2)
    engine.Trainer.loop(trainer)
    window = trainer.clock.period
    assert window == (engine.Window(True, False, 0.5), engine.Window(False, True, 0.5))
    assert calls == [
        *step_calls(1, range(4), window),
        *[("validate",), ("on_interval_end", 4)],
        *step_calls(1, range(4, 8), window),
        *[("validate",), ("log",), ("on_interval_end", 8)],
    ]
    assert (trainer.state.epoch, trainer.state.batch, trainer.state.step) == (1, 8, 8)
    resumed, calls = stub(epochs=None, batches=None, max_steps=4, state=engine.State(batch=5, step=5))
    engine.Trainer.loop(resumed)
    assert calls == [*step_calls(1, range(5, 8), window), ("validate",), ("log",), ("on_interval_end", 8)]


def test_an_endless_stream_without_max_steps_is_refused_in_one_line():
    with pytest.raises(engine.ConfigError, match=r"^max_steps: required, the training data is endless"):
        stub(epochs=5, batches=None)


def test_a_stop_request_ends_the_loop_after_its_epoch():
    trainer, calls = stub(epochs=5)
    trainer.epoch_end.append(lambda epoch: setattr(trainer.state, "stop", epoch == 2))
    engine.Trainer.loop(trainer)
    assert [call for call in calls if call[0] == "on_epoch_end"] == [("on_epoch_end", 1), ("on_epoch_end", 2)]
    assert trainer.state.step == 6


def test_a_stop_request_at_a_point_counted_in_steps_ends_the_run_there():
    trainer, calls = stub(epochs=None, batches=None, max_steps=100, val_every_steps=2)
    trainer.interval_end.append(lambda step: setattr(trainer.state, "stop", step == 8))
    engine.Trainer.loop(trainer)
    assert calls[-2:] == [("validate",), ("on_interval_end", 8)] and trainer.state.step == 8


def test_a_signal_stops_the_loop_at_the_end_of_the_current_window():
    trainer, calls = stub()
    step = trainer.train_step

    def signalled(batch, window):
        trainer.interrupted = 15  # SIGTERM, during the window's first batch
        return step(batch, window)

    trainer.train_step = signalled
    with pytest.raises(engine.Interrupted) as raised:
        engine.Trainer.loop(trainer)
    assert raised.value.exit_code == 143
    assert calls == epoch_calls(1, trainer.clock.period)[:4]  # the window's two batches, then no more
    assert (trainer.state.batch, trainer.state.step) == (2, 2)
    trainer, _ = stub()
    # Another process of a DDP run (rank 1) stops at its next collective, which rank 0 left.
    trainer.train_step, trainer.distributed = signalled, SimpleNamespace(stops=lambda step: False)
    engine.Trainer.loop(trainer)
    assert trainer.state.step == 6


def code_lines(function) -> int:
    """Lines holding code in a function's body: no signature, docstring, comment or blank line."""
    source = textwrap.dedent(inspect.getsource(function))
    definition = ast.parse(source).body[0]
    body = definition.body[1:] if ast.get_docstring(definition) else definition.body
    quiet = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = {
        token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type not in quiet
    }
    return len({line for line in lines if line >= body[0].lineno})


def test_code_lines_counts_the_code_of_a_body_only():
    def sample(x: int) -> int:
        """A docstring
        of two lines."""
        # a comment

        y = (
            x  # a comment inside a statement
            + 1
        )
        return y

    assert code_lines(sample) == 5  # y = (, x, + 1, ), return y


def test_the_loop_and_the_end_of_an_epoch_read_in_one_screen():
    """STYLE.md: the loop reads like the tutorial's and stays under 40 lines; resume, interruption
    and evaluation live in the state, the trainer's other methods and plugins, not in the loop.
    The ends of its epochs and of its intervals counted in steps, and the choice of what is due
    at either (`measure`), count with it."""
    functions = (engine.Trainer.loop, engine.Trainer.end_epoch, engine.Trainer.end_interval, engine.Trainer.measure)
    assert sum(code_lines(function) for function in functions) <= 40, [code_lines(f) for f in functions]
    for function in functions:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        assert not any(isinstance(node, ast.Try) for node in ast.walk(tree)), function.__name__


# --- the end of a run: the final_model chain -----------------------------------------------------


class Ending(Recorder):
    """Records the hooks, and ends the run with a copy of the trained module, its weights doubled."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bool] = []

    @engine.hookimpl
    def final_model(self, module, ending, trainer):
        self.calls.append("final_model" if ending else "final_model, not ending")  # (checkpoints ask too)
        self.received.append(module is trainer.module)
        doubled = copy.deepcopy(module)
        with torch.no_grad():
            for parameter in doubled.parameters():
                parameter.mul_(2)
        return doubled


def test_the_run_ends_with_the_final_model_chain_called_once_after_the_last_epoch():
    ending = Ending()
    trainer = engine.setup(job(epochs=3, data={"test_fraction": 0.2}), plugins=[ending])
    result = trainer.fit()
    assert ending.calls.count("final_model") == 1 and all(ending.received)
    test = ["before_forward", "compute_loss", "compute_metrics"]  # the test data, once, on the final model
    ended = [call for call in ending.calls if call != "final_model, not ending"]
    assert ended[-6:] == ["on_epoch_end", "final_model", *test, "on_run_end"]
    # The run ends with the chain's result; the trainer keeps the trained weights.
    assert result.model is trainer.final_module and not result.model.training
    assert torch.equal(result.model.weight, 2 * trainer.module.weight)
    plain = engine.run(job(epochs=3, data={"test_fraction": 0.2}, run_name="plain"))
    assert torch.equal(trainer.module.weight, plain.model.weight)
    # The test data is evaluated on the final model; model.pt holds it.
    [test] = trainer.loaders.test()
    with torch.no_grad():
        assert result.metrics["test_loss"] == pytest.approx(nn.functional.mse_loss(result.model(test.x), test.y).item())
    saved = engine.runs.load(result.run_dir / engine.runs.MODEL, engine.runs.MODEL_FORMAT)
    assert torch.equal(saved["model"]["weight"], result.model.weight)


def test_trainer_final_model_runs_the_chain_on_the_weights_as_they_are_now():
    ending = Ending()
    trainer = engine.setup(job(), plugins=[ending])
    assert torch.equal(trainer.final_model().weight, 2 * trainer.module.weight)
    assert ending.received == [True] and trainer.final_module is None  # the run has not ended


class NotAModule:
    @engine.hookimpl
    def final_model(self):
        return 5


def test_a_final_model_that_is_not_a_module_fails_the_run_in_one_line():
    with pytest.raises(engine.TrainingError) as raised:  # at the first checkpoint, which keeps the chain's model
        engine.run(job(epochs=2), plugins=[NotAModule])
    message = str(raised.value)
    assert message.startswith("end of epoch 2, step 2: ") and "\n" not in message
    assert message.endswith("plugin 'NotAModule': hook final_model returned a int, not Module")
    summary = engine.runs.read_summary(Path("runs/quick"))
    assert summary["status"] == "failed" and summary["error"] == str(raised.value)
    assert not (Path("runs/quick") / engine.runs.MODEL).exists()


# --- checkpoints and the plugins' state in them ----------------------------------------------------


def test_a_checkpoint_is_taken_only_at_the_end_of_an_accumulation_window():
    trainer = engine.setup(job(grad_accumulation=2, data={"batch_size": 25}))  # windows: batches 1-2, 3-4
    trainer.state.batch = 1
    with pytest.raises(engine.TrainingError, match="at the end of an accumulation window, not inside one"):
        trainer.checkpoint()
    trainer.state.batch = 2
    taken = trainer.checkpoint()
    assert taken["format"] == engine.runs.CHECKPOINT_FORMAT and taken["state"]["batch"] == 2
    assert set(taken) == {
        "format",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "state",
        "evaluated",
        "plugins",
        "course",
    }


def test_two_plugins_returning_one_state_key_is_an_error_naming_the_key():
    class First:
        @engine.hookimpl
        def save_plugin_state(self):
            return {"shared": 1}

    class Second(First):
        pass

    class NotADict:
        @engine.hookimpl
        def save_plugin_state(self):
            return [1]

    trainer = engine.setup(job(), plugins=[First, Second])
    with pytest.raises(engine.TrainingError, match=r"^hook save_plugin_state: two plugins return the state 'shared'$"):
        trainer.checkpoint()
    trainer = engine.setup(job(), plugins=[NotADict])
    with pytest.raises(engine.TrainingError, match=r"^hook save_plugin_state returned a list, not a dict$"):
        trainer.checkpoint()


def test_a_plugins_state_goes_through_a_checkpoint_and_comes_back_on_resume():
    made = []

    class Counted:
        """Counts the steps of the run, across its resumes."""

        def __init__(self) -> None:
            self.steps, self.received = 0, None
            made.append(self)

        @engine.hookimpl
        def after_step(self):
            self.steps += 1

        @engine.hookimpl
        def save_plugin_state(self):
            return {"counted": {"steps": torch.tensor(self.steps), "note": "kept"}}

        @engine.hookimpl
        def load_plugin_state(self, state):
            self.received = state
            self.steps = int(state["counted"]["steps"])

    first = engine.run(job(epochs=3), plugins=[Counted])
    assert made[0].steps == 3 and made[0].received is None
    engine.run(job(epochs=5), plugins=[Counted], resume=first.run_dir)
    resumed = made[1]
    assert resumed.received["counted"]["note"] == "kept" and int(resumed.received["counted"]["steps"]) == 3
    assert "checkpoint" in resumed.received  # every plugin's state, merged
    assert resumed.steps == 5


def test_resume_auto_starts_a_named_run_then_continues_it():
    first = engine.setup(job(epochs=2, resume="auto"))
    assert first.resumed_from is None and first.run_dir is None  # created when it starts
    first.fit()
    again = engine.setup(job(epochs=4, resume="auto"))
    assert again.run_dir == first.run_dir and again.resumed_from is not None
    assert again.state.step == 2
    assert again.fit().state.step == 4


def test_resume_needs_a_plugin_that_finds_the_checkpoint_inside_the_run(tmp_path):
    bare = engine.run(job(epochs=2, run_name="bare"), blocked=["checkpoint"])
    with pytest.raises(engine.ConfigError, match="--resume: no plugin implements find_checkpoint"):
        engine.setup(resume=bare.run_dir, blocked=["checkpoint"])
    result = engine.run(job(epochs=2))

    class Elsewhere:
        @engine.hookimpl(tryfirst=True)
        def find_checkpoint(self):
            return tmp_path / "elsewhere.pt"

    with pytest.raises(engine.ConfigError, match=r"checkpoint '.*elsewhere.pt' is outside run 'runs/quick'"):
        engine.setup(resume=result.run_dir, plugins=[Elsewhere])

    class Numbered:
        @engine.hookimpl(tryfirst=True)
        def find_checkpoint(self):
            return 5

    with pytest.raises(engine.ConfigError, match=r"^hook find_checkpoint returned int 5, not a path$"):
        engine.setup(resume=result.run_dir, plugins=[Numbered])
