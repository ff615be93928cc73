"""Plugin discovery, the component table and the binding of the hooks the core calls one by one.

A fresh :class:`Plugins` is built for every run: there is no global plugin manager.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import pluggy

from . import hookspecs
from .components import Component, import_object
from .errors import ConfigError, one_line, suggest
from .schema import Setting, settings_of

ENTRY_POINT_GROUP = "engine.plugins"
# Built-in plugins the engine cannot run without (pytest's essential_plugins): blocking one is
# refused. Declared in the same distribution's pyproject.toml, beside the plugins.
ESSENTIAL_GROUP = "engine.essential"
BLOCK_VARIABLE = "ENGINE_BLOCK"
# The distribution whose entry points are the engine's own built-in plugins.
OWN_DISTRIBUTION = "torch-plugin-engine"
# The prefix of the private module names that plugin files are imported under.
PLUGIN_FILE_MODULE = "_engine_plugin_file_"
DEFAULT = "default"  # the key of register_components' defaults, {kind: name}


@dataclass(slots=True)
class Plugins:
    """The plugin manager of one run, with where each plugin came from and what it provides."""

    pm: pluggy.PluginManager
    sources: dict[str, str] = field(default_factory=dict)
    essential: frozenset[str] = frozenset()
    blocked: list[Any] = field(default_factory=list)  # the blocked entry points, not loaded
    components: dict[str, dict[str, Component]] = field(default_factory=dict)
    defaults: dict[str, Component] = field(default_factory=dict)  # kind: the default component
    settings: dict[str, dict[str, Setting]] = field(default_factory=dict)
    # Each section's settings classes with their keys, called with the resolved values to check them.
    checks: dict[str, list[tuple[Callable[..., Any], str, list[str]]]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def names(self) -> list[str]:
        """Registered plugin names in registration order (pluggy keeps them in a set)."""
        return [name for name in self.sources if self.pm.get_plugin(name) is not None]

    def collect(self) -> None:
        """Gather settings and components from every plugin, rejecting clashes by name."""
        for plugin, declared in self.collected("register_settings", "section"):
            for section, settings_class in declared.items():
                self.add_settings(plugin, section, settings_class)
        for plugin, provided in self.collected("register_components", "kind"):
            for kind, named in provided.items():
                named = _mapping(named, plugin, "register_components", f"{kind} name")
                for name, value in named.items():
                    if kind == DEFAULT:
                        self.add_default(plugin, name, value)
                    else:
                        self.add_component(plugin, kind, name, value)
        for kind, default in list(self.defaults.items()):
            if default.name not in self.components.get(kind, {}):
                raise ConfigError(
                    f"plugin {default.plugin!r}: the default {kind} {default.name!r} is not a {kind} component"
                )

    def collected(self, hook: str, keys: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
        """Each plugin's return of an argument-less registration `hook`, as a mapping."""
        for plugin, call in self.bind_by_plugin(hook):
            try:
                value = call()
            except ConfigError:
                raise
            except Exception as error:
                raise ConfigError(f"plugin {plugin!r} failed in hook {hook}: {one_line(error)}") from error
            yield plugin, _mapping(value, plugin, hook, keys)

    def add_settings(self, plugin: str, section: str, settings_class: Any) -> None:
        if not callable(settings_class):
            raise ConfigError(
                f"plugin {plugin!r}: register_settings must map section {section!r} to a settings class, "
                f"got {type(settings_class).__name__}"
            )
        table = self.settings.setdefault(section, {})
        declared = settings_of(settings_class, plugin)
        if isinstance(settings_class, type):
            self.checks.setdefault(section, []).append((settings_class, plugin, list(declared)))
        for key, setting in declared.items():
            if key in table:
                raise ConfigError(
                    f"setting {dotted(section, key)} is declared by both plugin {table[key].owner!r} "
                    f"and plugin {plugin!r}"
                )
            table[key] = setting

    def add_blocked_settings(self) -> bool:
        """The settings of the blocked entry-point plugins that no registered plugin declares, so
        that a job that sets them (a run's config.toml does) stays valid: checked against their
        schema and unused. Loaded only when a job names a setting nobody else declares; whether
        any was added."""
        added, blocked, self.blocked = False, self.blocked, []
        for ep in blocked:
            try:
                loaded = ep.load()
                declare = getattr(loaded() if inspect.isclass(loaded) else loaded, "register_settings", None)
                declared = declare() if declare is not None and hasattr(declare, f"{hookspecs.PROJECT}_impl") else {}
            except Exception:  # a blocked plugin that cannot even load has nothing to say here
                continue
            for section, settings_class in _mapping(declared, ep.name, "register_settings", "section").items():
                table = self.settings.setdefault(section, {})
                for key, setting in settings_of(settings_class, f"{ep.name} (blocked)").items():
                    added = added or key not in table
                    table.setdefault(key, setting)
        return added

    def add_component(self, plugin: str, kind: str, name: str, factory: Any) -> None:
        table = self.components.setdefault(kind, {})
        if name in table:
            raise ConfigError(
                f"{kind} {name!r} is provided by both plugin {table[name].plugin!r} and plugin {plugin!r}"
            )
        if not callable(factory):
            raise ConfigError(
                f"plugin {plugin!r}: {kind} {name!r} is not a factory (a callable), got {type(factory).__name__}"
            )
        table[name] = Component(kind, name, factory, plugin)

    def add_default(self, plugin: str, kind: str, name: Any) -> None:
        if not isinstance(name, str):
            raise ConfigError(f"plugin {plugin!r}: the default {kind} must be a component's name, got {name!r}")
        if kind in self.defaults:
            first = self.defaults[kind].plugin
            raise ConfigError(f"the default {kind} is declared by both plugin {first!r} and plugin {plugin!r}")
        self.defaults[kind] = Component(kind, name, _no_factory, plugin)

    def component(self, kind: str, name: str) -> Component:
        """The component `name` of `kind`; ``"package.module:factory"`` names import one."""
        if ":" in name:
            return Component(kind, name, import_object(name, f"{kind}.name"), "")
        table = self.components.get(kind, {})
        if name not in table:
            raise ConfigError(f"{kind}.name: unknown {kind} {name!r}{suggest(name, table)}")
        return table[name]

    def default(self, kind: str) -> str | None:
        """The name of the component a plugin declared the default of `kind`, or None."""
        found = self.defaults.get(kind)
        return found.name if found is not None else None

    def bind(self, hook_name: str, *, without: Collection[str] = (), **constants: Any) -> list[Callable[..., Any]]:
        """The implementations of a one-by-one hook in call order, with `constants` bound, except
        those of the plugins named in `without`.

        Each returned callable takes the hook's remaining arguments by keyword and passes each
        implementation only those it declares.
        """
        return [bound for _, bound in self.bind_by_plugin(hook_name, without=without, **constants)]

    def bind_by_plugin(
        self, hook_name: str, *, without: Collection[str] = (), **constants: Any
    ) -> list[tuple[str, Callable[..., Any]]]:
        """Like `bind`, with the name of the plugin of each implementation."""
        caller = getattr(self.pm.hook, hook_name)
        passed = {name for name in caller.spec.argnames if name not in constants}  # what each call gives
        return [
            (impl.plugin_name, _bound(impl.function, impl.argnames, constants, passed))
            for impl in reversed(caller.get_hookimpls())
            if impl.plugin_name not in without
        ]

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


def _no_factory() -> None:
    """A default only names its component: it is never built from here."""


def _bound(
    function: Callable[..., Any], argnames: tuple[str, ...], constants: Mapping[str, Any], passed: set[str]
) -> Callable[..., Any]:
    fixed = {name: constants[name] for name in argnames if name in constants}
    wanted = tuple(name for name in argnames if name not in constants)
    if set(wanted) == passed:  # it takes every argument a call gives: nothing to pick out
        return functools.partial(function, **fixed)

    def call(**arguments: Any) -> Any:
        return function(**fixed, **{name: arguments[name] for name in wanted})

    return call


def _mapping(value: Any, plugin: str, hook: str, keys: str) -> Mapping[str, Any]:
    """`value` if it is a mapping with string keys (None: empty); else a ConfigError naming the plugin."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ConfigError(f"plugin {plugin!r}: {hook} must return a dict keyed by {keys}, got {type(value).__name__}")
    return value


def make_plugins(extra: Iterable[Any] = (), blocked: Iterable[str] = ()) -> Plugins:
    """A fresh plugin manager with the entry-point plugins, then `extra` ones, in that order.

    Entry points register sorted by name, so hook order never depends on install order; order
    between plugins that care is declared with tryfirst/trylast or by a chained hook's contract.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    essential = frozenset(ep.name for ep in entry_points(group=ESSENTIAL_GROUP))
    plugins = Plugins(pm, essential=essential)
    # ENGINE_BLOCK="progress,curves" blocks plugins for every run of an environment (a CI machine).
    from_environment = [name.strip() for name in os.environ.get(BLOCK_VARIABLE, "").split(",") if name.strip()]
    for name in [*blocked, *from_environment]:
        if name in essential:
            raise ConfigError(f"plugin {name!r} is essential and cannot be blocked (the engine cannot run without it)")
        pm.set_blocked(name)
    installed = entry_point_plugins()
    extras = [extra_plugin(item) for item in extra]
    known = {ep.name for ep in installed} | {name for _, name, _ in extras}
    for name in blocked:  # (ENGINE_BLOCK may name plugins a machine does not have)
        if name not in known:
            raise ConfigError(f"--block: no plugin is named {name!r}{suggest(name, known)}")
    for ep in installed:
        if pm.is_blocked(ep.name):
            continue
        try:
            loaded = ep.load()
        except Exception as error:
            raise ConfigError(f"plugin {ep.name!r} (entry point {ep.value}): cannot load: {one_line(error)}") from error
        dist = ep.dist.name if ep.dist is not None else "?"
        register(plugins, loaded, ep.name, "built-in" if dist == OWN_DISTRIBUTION else f"entry point of package {dist}")
    for loaded, name, origin in extras:
        register(plugins, loaded, name, origin)
    check_hook_names(pm)
    plugins.collect()
    plugins.blocked = [ep for ep in installed if pm.is_blocked(ep.name)]
    return plugins


def extra_plugin(item: Any) -> tuple[Any, str, str]:
    """A plugin given beside the installed ones: (the plugin, its name, where it came from)."""
    if isinstance(item, str):
        loaded, name = load_plugin(item)
        return loaded, name, f"--plugin {item}"
    return item, getattr(item, "__name__", None) or type(item).__name__, "passed to engine.run"


def entry_point_plugins() -> list[Any]:
    """The engine's entry points, sorted by name; one name declared by two packages is an error."""
    declared: dict[str, Any] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in declared:
            first = declared[ep.name]
            if (first.dist.name if first.dist is not None else "?", first.value) == (dist, ep.value):
                continue  # one distribution found twice on the path
            raise ConfigError(
                f"plugin name {ep.name!r} is declared by two entry points: {first.value} of package "
                f"{first.dist.name if first.dist else '?'} and {ep.value} of package {dist}; uninstall one or "
                "rename its entry point"
            )
        declared[ep.name] = ep
    return list(declared.values())


def check_hook_names(pm: pluggy.PluginManager) -> None:
    """Reject an implementation of a hook the engine does not declare (pluggy accepts it silently,
    until `check_pending`, so a misspelled hook would never be called), and a wrapper of a hook
    the core calls one implementation at a time."""
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
            if name in hookspecs.ONE_BY_ONE and (impl.hookwrapper or impl.wrapper):
                how = "per step or epoch" if name in hookspecs.PER_STEP else "one implementation at a time"
                raise ConfigError(
                    f"plugin {impl.plugin_name!r}: hook {name} is called {how} by the engine and takes no wrapper"
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
        try:
            plugin = plugin()
        except Exception as error:
            raise ConfigError(f"plugin {name!r} ({origin}): cannot be instantiated: {one_line(error)}") from error
    try:
        plugins.pm.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # pluggy's are several
        raise ConfigError(f"plugin {name!r}: {'; '.join(lines)}") from error
    except Exception as error:  # an object pluggy cannot even inspect
        raise ConfigError(f"plugin {name!r} ({origin}): cannot be registered: {one_line(error)}") from error
    if not plugins.pm.get_hookcallers(plugin):
        # A plugin with no hook is a mistake (a misspelled marker, the wrong object): it would do nothing.
        plugins.pm.unregister(plugin)
        what = "module" if inspect.ismodule(plugin) else type(plugin).__name__
        raise ConfigError(
            f"plugin {name!r} ({origin}): a {what} with no hook implementation (mark them with @engine.hookimpl)"
            + _class_inside(plugin, origin)
        )
    plugins.sources[name] = origin


def _class_inside(module: Any, origin: str) -> str:
    """``; its class X implements hooks: load it as 'file.py:X'`` for a module whose hooks are in a class."""
    if not inspect.ismodule(module):
        return ""
    marker = f"{hookspecs.PROJECT}_impl"
    classes = [
        name
        for name, value in vars(module).items()
        if inspect.isclass(value)
        and value.__module__ == module.__name__
        and any(hasattr(member, marker) for member in vars(value).values())
    ]
    if not classes:
        return ""
    spec = origin.removeprefix("--plugin ")
    return f"; its class {classes[0]} implements hooks: load it as '{spec}:{classes[0]}'"


def plugin_target(spec: str) -> tuple[str, str]:
    """A plugin spec split into its module (a dotted name or a ``.py`` file) and the name of a class
    or object in it (empty: the module itself): ``pkg.module:Class``, ``path/file.py:Class``."""
    target, sep, attribute = spec.rpartition(":")
    if sep and target and attribute.isidentifier():
        return target, attribute
    return spec, ""  # no attribute (a Windows path's drive colon is not one)


def is_plugin_file(spec: str) -> bool:
    """Whether a --plugin argument names a file (else a module to import by name)."""
    target, _ = plugin_target(spec)
    return target.endswith(".py") or "/" in target or "\\" in target


def load_plugin(spec: str) -> tuple[Any, str]:
    """The plugin a --plugin argument names, and its plugin name: a module by dotted name or
    ``.py`` file (named by its module or file name), or a class or object in one (``module:Class``,
    named as given)."""
    target, attribute = plugin_target(spec)
    module = load_module(target)
    if not attribute:
        return module, Path(target).stem if is_plugin_file(target) else module.__name__
    try:
        return getattr(module, attribute), spec
    except AttributeError:
        raise ConfigError(f"plugin {spec!r}: {target!r} has no attribute {attribute!r}") from None


def load_module(spec: str) -> ModuleType:
    """Import a plugin module by dotted name, or from a ``.py`` file path.

    A file is imported under a private module name (a digest of its path and modification time),
    so that a plugin file named like another module (``json.py``) does not replace it in
    `sys.modules`, and so that the command line and the run it starts import it once.
    """
    if not is_plugin_file(spec):
        try:
            return importlib.import_module(spec)
        except Exception as error:
            raise ConfigError(f"plugin module {spec!r} cannot be imported: {one_line(error)}") from error
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"plugin file {spec!r} does not exist")
    stat = path.stat()
    digest = hashlib.sha1(f"{path.absolute()}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"{PLUGIN_FILE_MODULE}{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plugin file {spec!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look a module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException as error:
        del sys.modules[name]
        if not isinstance(error, Exception):
            raise
        raise ConfigError(f"plugin file {spec!r} failed to import: {one_line(error)}") from error
    return module


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key
