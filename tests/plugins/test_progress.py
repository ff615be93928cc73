"""plugins/progress.py: a tqdm bar only on a terminal, closed at the end."""

from __future__ import annotations

import sys

import engine
from tests.helpers import job


def progress_of(trainer: engine.Trainer):
    return trainer.plugins.pm.get_plugin("progress")


def test_no_bar_when_not_on_a_terminal():
    trainer = engine.setup(job())
    trainer.fit()
    assert progress_of(trainer).bar is None


def test_a_bar_over_every_step_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    trainer = engine.setup(job(epochs=4, data={"batch_size": 25}))
    trainer.fit()
    bar = progress_of(trainer).bar
    assert bar is not None and bar.total == 16 and bar.n == 16
    assert "loss" in bar.postfix


def test_the_bar_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    trainer = engine.setup(job(log={"progress": False}))
    trainer.fit()
    assert progress_of(trainer).bar is None
