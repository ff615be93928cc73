"""The errors the engine reports to users: one line that names what is at fault."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable
from typing import Any


class EngineError(Exception):
    """An error with a message fit for the user; `exit_code` is what the CLI exits with."""

    exit_code = 1
    # Whether the process that raised it prints it. None: undecided, so the CLI decides (a single
    # process does; of a launcher's processes, which all read the same config, rank 0). Of a run
    # over several processes, only the one whose error came first shows it; the others stop
    # because of it, quietly (Distributed.failed).
    shown: bool | None = None


class ConfigError(EngineError):
    """Bad usage or configuration, found before training starts (exit code 2)."""

    exit_code = 2


class TrainingError(EngineError):
    """A failure during training: a non-finite loss, a shape mismatch, a plugin's exception.

    The engine prefixes the epoch and step where it was raised unless `located` says the message
    already names them.
    """

    exit_code = 1

    def __init__(self, message: str, *, located: bool = False) -> None:
        super().__init__(message)
        self.located = located


class Interrupted(EngineError):
    """The run stopped on SIGINT or SIGTERM after finishing its step, and wrote its checkpoint and
    an "interrupted" summary. The exit code is the shell's for the signal: 130, 143."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.signal_name = signal.Signals(number).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property  # type: ignore[override]
    def exit_code(self) -> int:
        return 128 + self.number

    def where(self, state: Any) -> None:
        """Name the position the run stopped at."""
        self.args = (f"interrupted by {self.signal_name} at epoch {state.epoch}, step {state.step}",)


def one_line(error: BaseException) -> str:
    """``TypeName: first line of the message``: how a foreign exception appears in our messages."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `choices`, or an empty string."""
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def suggest(name: str, choices: Iterable[str]) -> str:
    """The closest of `choices`, or all of them: `` (choose one of: a, b)``."""
    choices = sorted(choices)
    return did_you_mean(name, choices) or (f" (choose one of: {', '.join(choices)})" if choices else "")
