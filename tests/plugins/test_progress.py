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


class PrintsHalfALine:
    """Prints a partial line at each logging point: the rest comes with the console's line."""

    def __init__(self) -> None:
        self.streams: list[str] = []

    @engine.hookimpl(tryfirst=True)
    def on_log(self) -> None:
        self.streams.append(type(sys.stdout).__name__)
        print("half ", end="")


def test_lines_printed_during_the_run_go_above_the_bar_whole(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    stdout = sys.stdout
    plugin = PrintsHalfALine()
    engine.run(job(epochs=4, log={"every": 2}), plugins=[plugin])
    assert plugin.streams == ["DummyTqdmFile", "DummyTqdmFile"]  # tqdm.write: the bar is cleared first
    assert sys.stdout is stdout  # given back at the end
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("half Epoch [2/4], Loss: ") and lines[1].startswith("half Epoch [4/4], Loss: ")
