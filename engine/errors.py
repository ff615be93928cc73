"""The errors the engine reports to users: one line that names what is at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EngineError(Exception):
    """An error with a message fit for the user; `exit_code` is what the CLI exits with."""

    exit_code = 1


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
