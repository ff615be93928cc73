"""A plugin-based PyTorch training engine: the tutorial's loop, with every feature a pluggy plugin.

The public API, what plugins may import, is the names below, each with the module it comes from.
They are imported on first use, not with the package, so that ``python -m engine`` can take over
Ctrl-C (engine/__main__.py) before torch is imported: a Ctrl-C during those seconds would
otherwise print the traceback of an import.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, by the module each comes from; "runs" is a module: the run directory's
# files, and the atomic writes plugins use for their own.
_HOMES = {
    "runs": ("runs",),
    "cli": ("Commands",),
    "calling": ("ModelLoss", "output_of"),
    "components": ("build_component",),
    "config": ("Config", "Section", "load_config"),
    "errors": ("ConfigError", "EngineError", "Interrupted", "TrainingError", "one_line", "suggest"),
    "checks": ("kept_rng",),
    "hookspecs": ("hookimpl", "hookspec"),
    "chain": ("rebuild_optimizer",),
    "plugins": ("ENTRY_POINT_GROUP", "Plugins", "make_plugins"),
    "saved": ("load", "model_file", "open_run", "trained_module"),
    "schema": ("Changeable", "FilePath", "Range", "dump_toml"),
    "start": ("run", "setup"),
    "steps": ("RunLength", "Window", "windows"),
    "trainer": ("Result", "Trainer"),
    "types": (
        "Acceleration",
        "Batch",
        "DataInfo",
        "Distributed",
        "ExportFormat",
        "InputTransform",
        "Loaders",
        "OneProcess",
        "Precision",
        "Runner",
        "Scheduled",
        "State",
        "Step",
        "TrainerView",
    ),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name, name if name in _HOMES else None)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{home}")
    value = module if name == home else getattr(module, name)
    if name in _HOME:
        globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
