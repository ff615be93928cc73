"""Plugin discovery, the component table and the per-step hook binding.

A fresh :class:`Plugins` is built for every run: there is no global plugin manager.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import pluggy

from . import hookspecs
from .errors import ConfigError

ENTRY_POINT_GROUP = "engine.plugins"
# The distribution whose entry points are the engine's own built-in plugins.
OWN_DISTRIBUTION = "torch-plugin-engine"
# Hooks called once per batch or per epoch (on the tutorial job an epoch is one step): bound at
# setup and called without pluggy's dispatch (about 2 us a call even with no implementation, 4 us
# for on_epoch_end's two), so they cannot take wrappers.
BOUND_HOOKS = (
    "before_forward",
    "compute_loss",
    "before_optimizer_step",
    "after_step",
    "compute_metrics",
    "on_epoch_end",
)
# Parameter names that receive the run's context instead of a setting, by component kind.
CONTEXT_PARAMS = frozenset({"seed", "info", "params", "optimizer", "schedule", "device"})


@dataclass(slots=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass(slots=True)
class Plugins:
    """The plugin manager of one run, with where each plugin came from and what it provides."""

    pm: pluggy.PluginManager
    sources: dict[str, str] = field(default_factory=dict)
    components: dict[str, dict[str, Component]] = field(default_factory=dict)
    settings: dict[str, dict[str, tuple[Any, str]]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def names(self) -> list[str]:
        """Registered plugin names in registration order (pluggy keeps them in a set)."""
        return [name for name in self.sources if self.pm.get_plugin(name) is not None]

    def collect(self) -> None:
        """Gather settings and components from every plugin, rejecting clashes by name."""
        for impl in reversed(self.pm.hook.register_settings.get_hookimpls()):
            declared = call_blaming(impl, "register_settings") or {}
            for section, keys in declared.items():
                table = self.settings.setdefault(section, {})
                for key, default in keys.items():
                    if key in table:
                        raise ConfigError(
                            f"setting {dotted(section, key)} is declared by both plugin "
                            f"{table[key][1]!r} and plugin {impl.plugin_name!r}"
                        )
                    table[key] = (default, impl.plugin_name)
        for impl in reversed(self.pm.hook.register_components.get_hookimpls()):
            provided = call_blaming(impl, "register_components") or {}
            for kind, named in provided.items():
                table = self.components.setdefault(kind, {})
                for name, factory in named.items():
                    if name in table:
                        raise ConfigError(
                            f"{kind} {name!r} is provided by both plugin {table[name].plugin!r} "
                            f"and plugin {impl.plugin_name!r}"
                        )
                    table[name] = Component(kind, name, factory, impl.plugin_name)

    def component(self, kind: str, name: str) -> Component:
        """The component `name` of `kind`; ``"package.module:factory"`` names import one."""
        if ":" in name:
            return Component(kind, name, import_object(name, f"{kind}.name"), "")
        table = self.components.get(kind, {})
        if name not in table:
            raise ConfigError(f"{kind}.name: unknown {kind} {name!r}{suggest(name, table)}")
        return table[name]

    def bind(self, hook_name: str, **constants: Any) -> list[Callable[..., Any]]:
        """The implementations of a per-step hook in call order, with `constants` bound.

        Each returned callable takes the hook's remaining arguments by keyword and passes each
        implementation only those it declares.
        """
        caller = getattr(self.pm.hook, hook_name)
        passed = {name for name in caller.spec.argnames if name not in constants}  # what each call gives
        return [_bound(impl.function, impl.argnames, constants, passed) for impl in reversed(caller.get_hookimpls())]

    def blame(self, tb: TracebackType | None) -> tuple[str, str] | None:
        """(plugin, hook) of the innermost plugin frame in a traceback, or None."""
        modules: dict[str, list[str]] = {}
        for plugin in self.pm.get_plugins():
            module = plugin if isinstance(plugin, ModuleType) else sys.modules.get(type(plugin).__module__)
            if module is not None:
                modules.setdefault(module.__name__, []).append(self.pm.get_name(plugin))
        impl_of_code = {}
        for name in dir(self.pm.hook):
            caller = getattr(self.pm.hook, name)
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    impl_of_code[getattr(impl.function, "__func__", impl.function).__code__] = (impl.plugin_name, name)
        found = None
        hook = ""
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code in impl_of_code:
                # The implementation names its own plugin: several plugins may share one module.
                found = impl_of_code[frame.f_code]
                hook = found[1]
            else:
                owners = modules.get(frame.f_globals.get("__name__", ""), [])
                if owners and (found is None or found[0] not in owners):  # not a helper of the same plugin
                    found = (owners[0], hook)
            tb = tb.tb_next
        return found


def _bound(
    function: Callable[..., Any], argnames: tuple[str, ...], constants: Mapping[str, Any], passed: set[str]
) -> Callable[..., Any]:
    fixed = {name: constants[name] for name in argnames if name in constants}
    wanted = tuple(name for name in argnames if name not in constants)
    if set(wanted) == passed:
        # It takes every argument the call passes: forward them from C, without a Python frame of
        # ours per call (several calls a step; the frame cost about a tenth of a µs each).
        return functools.partial(function, **fixed)

    def call(**arguments: Any) -> Any:
        return function(**fixed, **{name: arguments[name] for name in wanted})

    return call


def call_blaming(impl: pluggy.HookImpl, hook: str) -> Any:
    """Call one implementation of an argument-less `hook`; an exception becomes a ConfigError naming both."""
    try:
        return impl.function()
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"plugin {impl.plugin_name!r} failed in hook {hook}: {describe(error)}") from error


def make_plugins(extra: Iterable[Any] = (), blocked: Iterable[str] = ()) -> Plugins:
    """A fresh plugin manager with the entry-point plugins, then `extra` ones, in that order.

    Entry points register sorted by name, so hook order never depends on install order; order
    between plugins that care is declared with tryfirst/trylast.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    for name in blocked:
        pm.set_blocked(name)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            loaded = ep.load()
        except Exception as error:
            raise ConfigError(f"plugin {ep.name!r} (entry point {ep.value}): cannot load: {describe(error)}") from error
        dist = ep.dist.name if ep.dist is not None else "?"
        origin = "built-in" if dist == OWN_DISTRIBUTION else f"entry point of package {dist}"
        register(plugins, loaded, ep.name, origin)
    for item in extra:
        if isinstance(item, str):
            module = load_module(item)
            register(plugins, module, module.__name__, f"--plugin {item}")
        else:
            name = getattr(item, "__name__", None) or type(item).__name__
            register(plugins, item, name, "passed to engine.run")
    check_hook_names(pm)
    plugins.collect()
    return plugins


def check_hook_names(pm: pluggy.PluginManager) -> None:
    """Reject an implementation of a hook the engine does not declare.

    pluggy accepts it silently (until `check_pending`), so a misspelled hook would never be called.
    """
    declared = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")]
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if not isinstance(caller, pluggy.HookCaller):
            continue
        for impl in caller.get_hookimpls():
            if not caller.has_spec() and not impl.optionalhook:
                raise ConfigError(
                    f"plugin {impl.plugin_name!r}: {name} is not a hook of the engine{suggest(name, declared)}"
                )
            if name in BOUND_HOOKS and (impl.hookwrapper or impl.wrapper):
                raise ConfigError(
                    f"plugin {impl.plugin_name!r}: hook {name} is called per step or epoch and takes no wrapper"
                )


def register(plugins: Plugins, plugin: Any, name: str, origin: str) -> None:
    """Register `plugin`; a class is instantiated, so per-run state lives in a fresh object."""
    if plugins.pm.is_blocked(name) or plugins.pm.has_plugin(plugin):
        return
    if plugins.pm.get_plugin(name) is not None:
        raise ConfigError(
            f"plugin name {name!r} is taken by {plugins.sources[name]}; cannot also load it from {origin}"
        )
    if inspect.isclass(plugin):
        plugin = plugin()
    try:
        plugins.pm.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        raise ConfigError(f"plugin {name!r}: {error}") from error
    plugins.sources[name] = origin


def load_module(spec: str) -> ModuleType:
    """Import a plugin module by dotted name, or from a ``.py`` file path."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"plugin file {spec!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[path.stem]
            raise ConfigError(f"plugin file {spec!r} failed to import: {describe(error)}") from error
        return module
    try:
        return importlib.import_module(spec)
    except Exception as error:
        raise ConfigError(f"plugin module {spec!r} cannot be imported: {describe(error)}") from error


def import_object(reference: str, key: str) -> Any:
    """The object named by ``"package.module:attribute"``."""
    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ConfigError(f"{key}: cannot import module {module_name!r}: {describe(error)}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attribute!r}") from None


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def suggest(name: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (choose one of: {', '.join(choices)})" if choices else ""
