"""A plugin-based PyTorch training engine: the tutorial's loop, with every feature a pluggy plugin."""

from .config import Config, Section, dump_toml, load_config
from .errors import ConfigError, EngineError, TrainingError
from .hookspecs import hookimpl, hookspec
from .loop import Result, Trainer, rebuild_optimizer, run, setup, total
from .plugins import ENTRY_POINT_GROUP, Plugins, make_plugins
from .schema import Range
from .types import (
    Acceleration,
    Batch,
    DataInfo,
    Loaders,
    Precision,
    RunLength,
    Scheduled,
    State,
    Step,
    TrainerView,
    Window,
    windows,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Acceleration",
    "Batch",
    "Config",
    "ConfigError",
    "DataInfo",
    "EngineError",
    "Loaders",
    "Plugins",
    "Precision",
    "Range",
    "Result",
    "RunLength",
    "Scheduled",
    "Section",
    "State",
    "Step",
    "Trainer",
    "TrainerView",
    "TrainingError",
    "Window",
    "dump_toml",
    "hookimpl",
    "hookspec",
    "load_config",
    "make_plugins",
    "rebuild_optimizer",
    "run",
    "setup",
    "total",
    "windows",
]
