"""engine/loop.py: the loop against the hand-written PyTorch loop, hook order, validation mode,
gradient accumulation, the state object, and `engine.run` from Python."""

from __future__ import annotations

import copy
import inspect
import random

import numpy as np
import pytest
import torch
from torch import nn

import engine
from tests.helpers import (
    QUICK,
    LossOnly,
    Recorder,
    classification_data,
    epoch_order,
    job,
    read_jsonl,
    tutorial_data,
    tutorial_loop,
)

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
        }
    )

    logged = [line["loss"] for line in read_jsonl(result.run_dir / "metrics.jsonl")]
    assert logged == pytest.approx(epoch_losses, abs=1e-5)
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


def test_extra_loss_terms_are_summed_and_logged_by_name(capsys):
    result = engine.run(job(epochs=2, log={"every": 1}), plugins=[L2])
    lines = read_jsonl(result.run_dir / "metrics.jsonl")
    for line in lines:
        assert set(line) >= {"loss", "mse", "l2"}
        assert line["loss"] == pytest.approx(line["mse"] + line["l2"], rel=1e-5)
    last = capsys.readouterr().out.splitlines()[1]
    m = result.metrics
    assert last == f"Epoch [2/2], Loss: {m['loss']:.4f}, mse: {m['mse']:.4f}, l2: {m['l2']:.4f}"


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


def test_train_step_is_one_function_of_a_batch_and_its_window_returning_detached_losses():
    trainer = engine.setup(job())
    batch = next(trainer.loaders.train(1))
    before = trainer.model.weight.detach().clone()
    loss, terms = trainer.train_step(batch, engine.Window(first=True, last=True, scale=1.0))
    assert not loss.requires_grad and loss.shape == ()
    assert set(terms) == {"mse"} and terms["mse"] is loss
    with torch.no_grad():
        assert loss.item() == pytest.approx(nn.functional.mse_loss(trainer.model(batch.x), batch.y).item(), rel=0.2)
    assert not torch.equal(before, trainer.model.weight)


def test_the_loop_fits_on_one_screen():
    source = inspect.getsource(engine.Trainer.loop)
    code = [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(code) <= 40


def test_state_dict_restores_the_rng_streams():
    state = engine.State(epoch=3, batch=2, step=12)
    saved = state.state_dict()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restored = engine.State()
    restored.load_state_dict(saved)
    assert (restored.epoch, restored.batch, restored.step) == (3, 2, 12)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_seed_sets_python_numpy_and_torch():
    engine.setup(job(seed=7))
    assert random.random() == random.Random(7).random()
    assert np.random.rand() == np.random.RandomState(7).rand()


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
    # A plugin class is instantiated per run: the run_files plugin starts empty each time.
    first = engine.setup(job()).plugins.pm.get_plugin("run_files")
    second = engine.setup(job()).plugins.pm.get_plugin("run_files")
    assert first is not second


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


class Snapshot:
    """Saves what a checkpoint would at one step, then interrupts the run."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, None

    @engine.hookimpl
    def after_step(self, state, trainer):
        if state.step == self.at:
            self.saved = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict(), state.state_dict()))
            raise KeyboardInterrupt


def test_a_run_resumed_from_its_state_mid_epoch_ends_exactly_like_an_uninterrupted_one():
    resumable = job(
        epochs=3,
        data={"batch_size": 25},
        model={"name": "mlp", "hidden": [8], "dropout": 0.2},  # dropout draws from the torch RNG
        optimizer={"name": "adamw"},
    )
    whole = engine.run({**resumable, "run_name": "whole"})

    snapshot = Snapshot(at=6)  # epoch 2, after its second batch of four
    with pytest.raises(KeyboardInterrupt):
        engine.run({**resumable, "run_name": "killed"}, plugins=[snapshot])
    model_state, optimizer_state, loop_state = snapshot.saved
    assert (loop_state["epoch"], loop_state["batch"], loop_state["step"]) == (2, 2, 6)

    trainer = engine.setup({**resumable, "run_name": "resumed"})
    trainer.model.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.state.load_state_dict(loop_state)
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
