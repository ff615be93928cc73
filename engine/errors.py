"""The errors the engine reports to users: one line that names what is at fault."""

from __future__ import annotations


class EngineError(Exception):
    """An error with a message fit for the user; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(EngineError):
    """Bad usage or configuration, found before training starts (exit code 2)."""

    exit_code = 2


class TrainingError(EngineError):
    """A failure during training: a non-finite loss, a shape mismatch, a plugin's exception."""

    exit_code = 1
