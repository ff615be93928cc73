"""The errors the engine reports to users: one line that names what is at fault."""

from __future__ import annotations


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
