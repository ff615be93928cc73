"""A plugin-based PyTorch training engine: the tutorial's loop, with every feature a pluggy plugin.

The public names are imported from their modules on first use, not with the package, so that
``python -m engine`` can take over Ctrl-C (engine/__main__.py) before torch is imported: a Ctrl-C
during those seconds would otherwise print the traceback of an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names as _HOMES, for readers and type checkers
    from . import runs
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

# The module each public name comes from.
_HOMES = {
    "runs": ("runs",),  # the run directory's layout and its atomic writes, for plugins that write there
    "config": ("Config", "Section", "dump_toml", "load_config"),
    "errors": ("ConfigError", "EngineError", "Interrupted", "TrainingError", "one_line"),
    "hookspecs": ("hookimpl", "hookspec"),
    "inference": ("Backend", "ExportReport", "evaluate", "export", "export_program", "load_backend", "predict"),
    "loop": ("Result", "Trainer", "load", "rebuild_optimizer", "run", "setup", "total"),
    "plugins": ("ENTRY_POINT_GROUP", "Plugins", "make_plugins"),
    "report": ("plot", "runs_table"),
    "schema": ("FilePath", "Range"),
    "types": (
        "Acceleration",
        "Batch",
        "DataInfo",
        "ExportFormat",
        "Loaders",
        "Precision",
        "RunLength",
        "Runner",
        "Scheduled",
        "Standardize",
        "State",
        "Step",
        "TrainerView",
        "Window",
        "windows",
    ),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
_SUBMODULES = frozenset({"cli", *_HOMES})

__all__ = [  # the public API, what plugins may import (the names of _HOMES)
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
    "run",
    "runs",
    "runs_table",
    "setup",
    "total",
    "windows",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name, name if name in _SUBMODULES else None)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = module if name == home else getattr(module, name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
