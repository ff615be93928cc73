"""A plugin-based PyTorch training engine: the tutorial's loop, with every feature a pluggy plugin."""

from .config import Config, Section, dump_toml
from .errors import ConfigError, EngineError, TrainingError
from .hookspecs import hookimpl, hookspec
from .loop import (
    Batch,
    DataInfo,
    Loaders,
    Result,
    State,
    Trainer,
    load_config,
    rebuild_optimizer,
    run,
    setup,
    total,
)
from .plugins import ENTRY_POINT_GROUP, Plugins, make_plugins

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "Config",
    "ConfigError",
    "DataInfo",
    "EngineError",
    "Loaders",
    "Plugins",
    "Result",
    "Section",
    "State",
    "Trainer",
    "TrainingError",
    "dump_toml",
    "hookimpl",
    "hookspec",
    "load_config",
    "make_plugins",
    "rebuild_optimizer",
    "run",
    "setup",
    "total",
]
