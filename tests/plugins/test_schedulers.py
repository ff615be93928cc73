"""plugins/schedulers.py: the learning rate of every step follows each schedule."""

from __future__ import annotations

import math

import pytest
import torch
from engine_plugins import schedulers

import engine
from tests.helpers import Recorder, job

# 50 samples in batches of 10: 5 steps per epoch.
DATA = {"n_samples": 50, "batch_size": 10}


def lrs(scheduler: dict, epochs: int = 4, **extra) -> Recorder:
    recorder = Recorder()
    engine.run(
        job(epochs=epochs, data=DATA, optimizer={"name": "sgd", "lr": 0.1}, scheduler=scheduler, **extra),
        plugins=[recorder],
    )
    return recorder


def test_no_scheduler_keeps_the_rate():
    assert set(lrs({"name": "none"}).lrs) == {0.1}


def test_step_multiplies_by_gamma_every_step_size_epochs():
    recorder = lrs({"name": "step", "step_size": 2, "gamma": 0.5}, epochs=5)
    per_epoch = [0.1, 0.1, 0.05, 0.05, 0.025]
    assert recorder.lrs == pytest.approx([lr for lr in per_epoch for _ in range(5)])
    assert recorder.epoch_lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])  # stepped before on_epoch_end


def test_cosine_decays_over_the_run_per_epoch():
    recorder = lrs({"name": "cosine", "eta_min": 0.01}, epochs=4)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert recorder.lrs[::5] == pytest.approx(expected)


def test_warmup_cosine_warms_up_linearly_then_decays_per_step():
    recorder = lrs({"name": "warmup_cosine", "warmup_steps": 4, "min_ratio": 0.1}, epochs=2)
    total = 10
    expected = [0.1 * (i + 1) / 4 for i in range(4)]
    expected += [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 4) / (total - 4)))) for i in range(4, total)]
    assert recorder.lrs == pytest.approx(expected)
    assert max(recorder.lrs) == pytest.approx(0.1)


def test_warmup_cosine_steps_once_per_accumulation_window():
    recorder = lrs({"name": "warmup_cosine", "warmup_steps": 3}, epochs=1, grad_accumulation=2)
    # 5 batches, windows [0, 1], [2, 3], [4]: the rate changes after each window.
    assert recorder.lrs == pytest.approx([0.1 / 3, 0.1 / 3, 0.2 / 3, 0.2 / 3, 0.1])


def test_onecycle_follows_torchs_one_cycle_policy():
    recorder = lrs({"name": "onecycle", "max_lr": 0.5, "pct_start": 0.25}, epochs=4)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    policy = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.5, epochs=4, steps_per_epoch=5, pct_start=0.25)
    expected = []
    for _ in range(20):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        policy.step()
    assert recorder.lrs == pytest.approx(expected)
    assert max(recorder.lrs) == pytest.approx(0.5)
    assert recorder.lrs[0] == pytest.approx(0.5 / 25)


def test_the_scheduler_is_on_the_trainer_for_checkpoints():
    trainer = engine.setup(job(scheduler={"name": "step"}))
    trainer.fit()
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR)
    constant = engine.setup(job(run_name="constant"))
    constant.fit()
    assert constant.scheduler is None


def test_scheduler_settings_are_validated():
    with pytest.raises(engine.ConfigError, match=r"scheduler.warmup: unknown key in \[scheduler\]"):
        engine.load_config(job(scheduler={"name": "warmup_cosine", "warmup": 10}))


def test_schedules_span_max_steps_when_it_ends_the_run():
    # 7 optimizer steps, ending within the second epoch: warmup_cosine spans them, cosine steps per step.
    recorder = lrs({"name": "warmup_cosine", "warmup_steps": 2, "min_ratio": 0.1}, epochs=None, max_steps=7)
    expected = [0.1 * (i + 1) / 2 for i in range(2)]
    expected += [0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 5))) for i in range(2, 7)]
    assert recorder.lrs == pytest.approx(expected)
    cosine = lrs({"name": "cosine", "eta_min": 0.01}, epochs=4, max_steps=7, run_name="cosine")  # max_steps first
    assert cosine.lrs == pytest.approx([0.01 + 0.09 * (1 + math.cos(math.pi * i / 7)) / 2 for i in range(7)])


def test_schedules_over_max_steps_count_optimizer_steps_not_batches():
    # Windows of 2 batches (the 5th alone): 4 optimizer steps are 7 batches.
    recorder = lrs({"name": "warmup_cosine", "warmup_steps": 4}, epochs=None, max_steps=4, grad_accumulation=2)
    assert len(recorder.lrs) == 7
    assert recorder.lrs == pytest.approx([0.025, 0.025, 0.05, 0.05, 0.075, 0.1, 0.1])


def test_a_schedule_counted_in_epochs_is_refused_on_endless_data():
    endless = engine.RunLength(epochs=None, steps_per_epoch=None, total_steps=100, batches=100)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(
        engine.ConfigError, match=r"^scheduler.name: 'step' counts epochs, and the training data is endless"
    ):
        schedulers.step_lr(optimizer, endless)
