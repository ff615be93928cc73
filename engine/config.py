"""The job config: TOML in, defaults and ``--set`` overrides merged, every key validated.

A config is resolved entirely before training starts: unknown sections and keys, wrong types and
unknown component names are errors naming the key, with the name probably meant.
"""

from __future__ import annotations

import inspect
import json
import math
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .plugins import CONTEXT_PARAMS, Plugins, dotted, suggest

# Component kinds the core itself builds; plugins may add more (their sections work the same).
CORE_KINDS = ("data", "model", "loss", "optimizer")
# The core's own top-level settings; plugins add theirs through `register_settings`.
CORE_SETTINGS: dict[str, Any] = {
    "seed": 42,
    "epochs": 1000,
    "device": "auto",
    "plugins": [],
    "grad_accumulation": 1,
    "val_every": 1,
    "run_name": "",
    "runs_dir": "runs",
}
MISSING = inspect.Parameter.empty


class Override:
    """A ``--set`` value: parsed as TOML, with its text kept for settings that take strings."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any) -> None:
        self.text, self.value = text, value


def plain(value: Any, expected: type | None = None) -> Any:
    """The value of a setting as given: an override's text where a string is expected."""
    if isinstance(value, Override):
        # A quoted TOML string (--set loss.name='"huber"') is already its value, quotes removed.
        return value.text if expected is str and not isinstance(value.value, str) else value.value
    return value


class Section(Mapping[str, Any]):
    """One resolved, read-only config section; keys read as attributes too (``config.data.batch_size``)."""

    __slots__ = ("_values", "params")

    def __init__(self, values: Mapping[str, Any], params: Iterable[str] = ()) -> None:
        self._values = dict(values)
        self.params = frozenset(params)  # the keys passed to the section's component factory

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def component_settings(self) -> dict[str, Any]:
        return {key: value for key, value in self._values.items() if key in self.params}

    def __repr__(self) -> str:
        return f"Section({self._values!r})"


class Config(Section):
    """The resolved config: top-level keys and one :class:`Section` per section."""

    def to_dict(self) -> dict[str, Any]:
        return {key: dict(value) if isinstance(value, Section) else value for key, value in self.items()}


def load_job(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"job file '{path}' cannot be read: {error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"job file '{path}' is not valid TOML: {error}") from None


def apply_overrides(job: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`job` with ``section.key=value`` overrides applied; values parse as TOML, else as strings."""
    merged = {key: dict(value) if isinstance(value, Mapping) else value for key, value in job.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key.count(".") > 1:
            raise ConfigError(f"--set {item!r}: expected section.key=value or key=value")
        try:
            value = Override(text, tomllib.loads(f"v = {text}")["v"])
        except tomllib.TOMLDecodeError:
            value = text
        section, _, name = key.rpartition(".")
        if section:
            target = merged.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {section!r} is a setting, not a section")
            target[name] = value
        else:
            merged[name] = value
    return merged


def resolve(job: Mapping[str, Any], plugins: Plugins) -> Config:
    """Validate `job` against every declared setting and component, filling in defaults."""
    settings = {"": {key: (value, "core") for key, value in CORE_SETTINGS.items()}}
    for section, keys in plugins.settings.items():
        for key, (default, owner) in keys.items():
            if key in settings.get(section, {}):
                raise ConfigError(f"plugin {owner!r} declares setting {dotted(section, key)}, which the core owns")
            settings.setdefault(section, {})[key] = (default, owner)
    kinds = list(dict.fromkeys([*CORE_KINDS, *plugins.components]))
    sections = list(dict.fromkeys([*kinds, *(s for s in settings if s)]))

    top = {key: value for key, value in job.items() if not isinstance(value, Mapping)}
    for section in job:
        if isinstance(job[section], Mapping) and section not in sections:
            raise ConfigError(f"unknown section [{section}]{suggest(section, sections)}")
    resolved: dict[str, Any] = _resolve_keys("", top, settings[""], {})
    if resolved["device"] not in ("auto", "cpu", "cuda") and not str(resolved["device"]).startswith("cuda:"):
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {resolved['device']!r}")
    for key in ("epochs", "grad_accumulation", "val_every"):
        if resolved[key] < 1:
            raise ConfigError(f"{key}: must be at least 1, got {resolved[key]}")

    for section in sections:
        given = dict(job.get(section, {}))
        declared = settings.get(section, {})
        params: dict[str, Any] = {}
        if section in kinds:
            name = plain(given.get("name", declared.get("name", (None,))[0]), str)
            if name is None:
                choices = ", ".join(sorted(plugins.components.get(section, {})))
                raise ConfigError(f"{section}.name: required, no plugin sets a default (choose one of: {choices})")
            if not isinstance(name, str):
                raise ConfigError(f"{section}.name: expected a string, got {name!r}")
            params = factory_settings(plugins.component(section, name).factory, section)
            given["name"] = name
            declared = {**declared, "name": (name, "core")}
            for key in params:
                if key in declared and key != "name":
                    raise ConfigError(
                        f"{section}.{key}: both a setting of plugin {declared[key][1]!r} and of {section} {name!r}"
                    )
        values = _resolve_keys(section, given, declared, params)
        resolved[section] = Section(values, params)
    return Config(resolved)


def _resolve_keys(
    section: str, given: Mapping[str, Any], declared: Mapping[str, tuple[Any, str]], params: Mapping[str, Any]
) -> dict[str, Any]:
    known = {**{key: default for key, (default, _) in declared.items()}, **params}
    for key in given:
        if key not in known:
            where = f"[{section}]" if section else "the top level"
            raise ConfigError(f"{dotted(section, key)}: unknown key in {where}{suggest(key, known)}")
    values = {}
    for key, default in known.items():
        if key not in given:
            if default is MISSING:
                raise ConfigError(f"{dotted(section, key)}: required setting is missing")
            values[key] = default
        else:
            values[key] = check_type(dotted(section, key), given[key], default)
    return values


def check_type(key: str, value: Any, default: Any) -> Any:
    """`value` converted to the type of `default`, or a ConfigError naming `key`."""
    if default is None or default is MISSING:
        return plain(value)
    expected = type(default)
    value = plain(value, expected)
    if expected is bool or isinstance(value, bool):
        ok = isinstance(value, bool) and expected is bool
    elif expected is float:
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif expected in (list, tuple):
        ok = isinstance(value, (list, tuple))
        value = expected(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def factory_settings(factory: Any, kind: str) -> dict[str, Any]:
    """The settings of a component factory: its parameters that are not run context."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    return {
        name: param.default
        for name, param in signature.parameters.items()
        if name not in CONTEXT_PARAMS and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }


def dump_toml(config: Mapping[str, Any]) -> str:
    """The config as TOML; a key whose value is None (unset: inferred at run time) is a comment."""
    lines = []
    tables = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(_toml_line(key, value))
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(_toml_line(key, value) for key, value in table.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (not set)"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ConfigError(f"value {value!r} cannot be written as TOML")
