"""Named components: the kinds the core builds, what their factories must return, and building one
from its config section with the run context it asks for."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

from .errors import ConfigError, EngineError, one_line
from .schema import MISSING, settings_of
from .types import Acceleration, Precision, Scheduled

# The component kinds the core builds, in the order of the setup chain, each with the names of
# the run context its factories may ask for (a parameter of that name receives it; every other
# parameter is a setting). Plugins may add kinds of their own; those receive no context. A data
# component receives ``labelled=False`` when `predict` reads unlabelled inputs with it, and
# ``inferred``, the config's [inferred] section: what a trained run recorded of its data (its
# vocabulary) when another file is read for it, empty for a new run.
CORE_KINDS: dict[str, tuple[str, ...]] = {
    "distributed": ("device",),
    "data": ("seed", "device", "labelled", "inferred"),
    "model": ("info", "device"),
    "loss": ("info", "device"),
    "optimizer": ("params", "named_params"),
    "precision": ("device",),
    "accelerate": ("trainer",),
    "scheduler": ("optimizer", "length"),
}
# Kinds a run may go without: when no plugin provides one, none is built (a single process, full
# precision, the eager step, a constant learning rate). So may every kind a plugin adds (``export``,
# used after training only): its section names none unless the job or a plugin's default does.
OPTIONAL_KINDS = frozenset({"distributed", "precision", "accelerate", "scheduler"})
# Kinds that no config section chooses: the loaders name the input transform they fitted (its
# factory takes ``info`` and returns the module, whose saved state is then loaded into it).
UNCONFIGURED_KINDS = frozenset({"input_transform"})
# What the factories of the core's kinds must return (data: checked by build_loaders).
BUILT_TYPES: dict[str, type] = {
    "model": torch.nn.Module,
    "loss": Callable,  # type: ignore[dict-item]  # of (output, target)
    "optimizer": torch.optim.Optimizer,
    "precision": Precision,
    "accelerate": Acceleration,
    "scheduler": Scheduled,
}
# What a class given as a component (``"package.module:Class"``) must derive from.
REFERENCED_CLASSES: dict[str, type] = {**BUILT_TYPES, "data": torch.utils.data.Dataset, "loss": torch.nn.Module}


@dataclass(slots=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # "" for a "package.module:factory" reference


def build_component(config: Any, plugins: Any, kind: str, name: str | None = None, **context: Any) -> Any:
    """The component of `kind` the config names (or `name`, with its default settings), built with
    the context its factory asks for; None for an optional kind with no component chosen."""
    section = config[kind]
    chosen = name or section["name"]
    if chosen is None:
        return None
    component: Component = plugins.component(kind, chosen)
    if chosen == section["name"]:
        arguments = section.component_settings()
    else:
        settings = settings_of(component.factory, f"{kind} {chosen!r}", CORE_KINDS.get(kind, ()))
        arguments = {key: s.default for key, s in settings.items() if s.default is not MISSING}
    try:
        wanted = inspect.signature(component.factory).parameters
    except (TypeError, ValueError):
        wanted = {}
    arguments.update({key: value for key, value in context.items() if key in wanted})
    source = f" (plugin {component.plugin!r})" if component.plugin else ""
    base = REFERENCED_CLASSES.get(kind)
    if inspect.isclass(component.factory) and base is not None and not issubclass(component.factory, base):
        # A class is its own factory: checked before it is called, so that nothing else runs.
        raise ConfigError(f"{kind}.name: {chosen!r} is a class but not a {base.__module__}.{base.__qualname__}")
    try:
        built = component.factory(**arguments)
    except EngineError:
        raise
    except Exception as error:
        raise ConfigError(f"{kind} {chosen!r}{source} cannot be built: {one_line(error)}") from error
    expected = BUILT_TYPES.get(kind)
    if expected is not None and not isinstance(built, expected) and not (built is None and kind in OPTIONAL_KINDS):
        raise ConfigError(
            f"{kind} {chosen!r}{source}: the factory returned a {type(built).__name__}, not a {expected.__name__}"
        )
    return built


def import_object(reference: str, key: str) -> Any:
    """The function or class named by ``"package.module:attribute"``.

    Only a function or class of a module outside the standard library: a job file's references
    are code it calls, and none of the standard library's (``os:system``, ``shutil:rmtree``) is
    a component.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute.isidentifier():
        raise ConfigError(f"{key}: {reference!r} is not a reference of the form 'package.module:name'")
    top = module_name.partition(".")[0]
    if top in sys.stdlib_module_names:
        raise ConfigError(
            f"{key}: {reference!r} is in the standard library, which provides no components; "
            "name a factory or class of your own"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(f"{key}: cannot import module {module_name!r}: {one_line(error)}") from error
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attribute!r}") from None
    if not (inspect.isfunction(found) or inspect.ismethod(found) or inspect.isclass(found)):
        raise ConfigError(
            f"{key}: {reference!r} is a {type(found).__name__}, not a function or class (a component's factory)"
        )
    # Where it is defined, not where it is named: a module may re-export the standard library's
    # (torch's modules import subprocess.Popen).
    home = getattr(found, "__module__", None) or ""
    if home.partition(".")[0] in sys.stdlib_module_names:
        raise ConfigError(
            f"{key}: {reference!r} is {home}.{getattr(found, '__qualname__', attribute)} of the standard library, "
            "which provides no components; name a factory or class of your own"
        )
    return found
