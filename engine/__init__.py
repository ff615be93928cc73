"""A plugin-based PyTorch training engine: the tutorial's loop, with every feature a pluggy plugin."""

from . import runs  # the run directory's layout and its atomic writes, for plugins that write there
from .config import Config, Section, dump_toml, load_config
from .errors import ConfigError, EngineError, Interrupted, TrainingError, one_line
from .hookspecs import hookimpl, hookspec
from .inference import Backend, ExportReport, evaluate, export, export_program, load_backend, predict
from .loop import Result, Trainer, load, rebuild_optimizer, run, setup, total
from .plugins import ENTRY_POINT_GROUP, Plugins, make_plugins
from .report import plot, runs_table
from .schema import FilePath, Range
from .types import (
    Acceleration,
    Batch,
    DataInfo,
    ExportFormat,
    Loaders,
    Precision,
    RunLength,
    Runner,
    Scheduled,
    Standardize,
    State,
    Step,
    TrainerView,
    Window,
    windows,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Acceleration",
    "Backend",
    "Batch",
    "Config",
    "ConfigError",
    "DataInfo",
    "EngineError",
    "ExportFormat",
    "ExportReport",
    "FilePath",
    "Interrupted",
    "Loaders",
    "Plugins",
    "Precision",
    "Range",
    "Result",
    "RunLength",
    "Runner",
    "Scheduled",
    "Section",
    "Standardize",
    "State",
    "Step",
    "Trainer",
    "TrainerView",
    "TrainingError",
    "Window",
    "dump_toml",
    "evaluate",
    "export",
    "export_program",
    "hookimpl",
    "hookspec",
    "load",
    "load_backend",
    "load_config",
    "make_plugins",
    "one_line",
    "plot",
    "predict",
    "rebuild_optimizer",
    "runs",
    "runs_table",
    "run",
    "setup",
    "total",
    "windows",
]
