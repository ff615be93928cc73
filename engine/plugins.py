"""Plugin discovery, the component table and the per-step hook binding.

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
from .errors import ConfigError, one_line, suggest
from .schema import Setting, settings_of

ENTRY_POINT_GROUP = "engine.plugins"
BLOCK_VARIABLE = "ENGINE_BLOCK"
# The distribution whose entry points are the engine's own built-in plugins.
OWN_DISTRIBUTION = "torch-plugin-engine"
# The prefix of the private module names that plugin files are imported under.
PLUGIN_FILE_MODULE = "_engine_plugin_file_"


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
        for impl in reversed(self.pm.hook.register_settings.get_hookimpls()):
            declared = _mapping(call_blaming(impl, "register_settings"), impl, "register_settings", "section")
            for section, settings_class in declared.items():
                if not callable(settings_class):
                    raise ConfigError(
                        f"plugin {impl.plugin_name!r}: register_settings must map section {section!r} to a "
                        f"settings class, got {type(settings_class).__name__}"
                    )
                table = self.settings.setdefault(section, {})
                declared_keys = settings_of(settings_class, impl.plugin_name)
                if isinstance(settings_class, type):
                    self.checks.setdefault(section, []).append((settings_class, impl.plugin_name, list(declared_keys)))
                for key, setting in declared_keys.items():
                    if key in table:
                        raise ConfigError(
                            f"setting {dotted(section, key)} is declared by both plugin "
                            f"{table[key].owner!r} and plugin {impl.plugin_name!r}"
                        )
                    table[key] = setting
        for impl in reversed(self.pm.hook.register_components.get_hookimpls()):
            provided = _mapping(call_blaming(impl, "register_components"), impl, "register_components", "kind")
            for kind, named in provided.items():
                named = _mapping(named, impl, "register_components", f"{kind} name")
                table = self.components.setdefault(kind, {})
                for name, factory in named.items():
                    if name in table:
                        raise ConfigError(
                            f"{kind} {name!r} is provided by both plugin {table[name].plugin!r} "
                            f"and plugin {impl.plugin_name!r}"
                        )
                    if not callable(factory):
                        raise ConfigError(
                            f"plugin {impl.plugin_name!r}: {kind} {name!r} is not a factory "
                            f"(a callable), got {type(factory).__name__}"
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


def _bound(
    function: Callable[..., Any], argnames: tuple[str, ...], constants: Mapping[str, Any], passed: set[str]
) -> Callable[..., Any]:
    fixed = {name: constants[name] for name in argnames if name in constants}
    wanted = tuple(name for name in argnames if name not in constants)
    if set(wanted) == passed:
        # It takes every argument the call passes: forward them from C, without a Python frame of
        # ours per call (several calls a step; the frame cost about a tenth of a µs each).
        return functools.partial(function, **fixed)
    if not wanted:  # it takes none of them: no dict of them to build (0.2 µs a call)

        def constant(**_: Any) -> Any:
            return function(**fixed)

        return constant

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
        raise ConfigError(f"plugin {impl.plugin_name!r} failed in hook {hook}: {one_line(error)}") from error


def _mapping(value: Any, impl: pluggy.HookImpl, hook: str, keys: str) -> Mapping[str, Any]:
    """`value` if it is a mapping with string keys (None: empty); else a ConfigError naming the plugin."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ConfigError(
            f"plugin {impl.plugin_name!r}: {hook} must return a dict keyed by {keys}, got {type(value).__name__}"
        )
    return value


def make_plugins(extra: Iterable[Any] = (), blocked: Iterable[str] = ()) -> Plugins:
    """A fresh plugin manager with the entry-point plugins, then `extra` ones, in that order.

    Entry points register sorted by name, so hook order never depends on install order; order
    between plugins that care is declared with tryfirst/trylast.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    # ENGINE_BLOCK="progress,curves" blocks plugins for every run of an environment (a CI machine).
    from_environment = [name.strip() for name in os.environ.get(BLOCK_VARIABLE, "").split(",") if name.strip()]
    for name in [*blocked, *from_environment]:
        pm.set_blocked(name)
    declared: dict[str, tuple[str, str]] = {}  # entry-point name: (distribution, value)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in declared:
            if declared[ep.name] == (dist, ep.value):
                continue  # one distribution found twice on the path
            first, value = declared[ep.name]
            raise ConfigError(
                f"plugin name {ep.name!r} is declared by two entry points: {value} of package {first} and "
                f"{ep.value} of package {dist}; uninstall one or rename its entry point"
            )
        declared[ep.name] = (dist, ep.value)
        if pm.is_blocked(ep.name):
            continue
        try:
            loaded = ep.load()
        except Exception as error:
            raise ConfigError(f"plugin {ep.name!r} (entry point {ep.value}): cannot load: {one_line(error)}") from error
        origin = "built-in" if dist == OWN_DISTRIBUTION else f"entry point of package {dist}"
        register(plugins, loaded, ep.name, origin)
    for item in extra:
        if isinstance(item, str):
            loaded, name = load_plugin(item)
            register(plugins, loaded, name, f"--plugin {item}")
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
        )
    plugins.sources[name] = origin


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

    A file is imported under a private module name (its path's digest), so that a plugin file
    named like another module (``json.py``) does not replace it in `sys.modules`.
    """
    if is_plugin_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"plugin file {spec!r} does not exist")
        digest = hashlib.sha1(str(path.absolute()).encode()).hexdigest()[:12]
        stem = re.sub(r"\W", "_", path.stem)
        name = f"{PLUGIN_FILE_MODULE}{stem}_{digest}"
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
    try:
        return importlib.import_module(spec)
    except Exception as error:
        raise ConfigError(f"plugin module {spec!r} cannot be imported: {one_line(error)}") from error


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
    return found


def dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key
