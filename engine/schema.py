"""Settings and their schema, read from annotated keyword parameters.

A component factory's keyword parameters are its settings; so are the fields of the classes that
plugins return from `register_settings`, and the core's own (`CoreSettings`). Their annotations
are the schema, as LightningCLI reads them: ``bool``, ``int``, ``float``, ``str``,
``list[int]``, ``tuple[float, float]``, ``dict[str, T]`` (a table: TOML's ``[section.key]`` or
``{ a = 1 }``; each value a T), ``Literal["a", "b"]``, ``T | None`` and
``Annotated[float, Range(gt=0)]``. A parameter without an annotation takes the type of its
default. A value that does not fit is a ConfigError naming the key, with the name probably meant.
Values go back to TOML through `dump_toml` (a run's config.toml).
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .errors import ConfigError, did_you_mean

MISSING = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class Range:
    """A bound on a number setting: ``Annotated[float, Range(gt=0)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        """What `value` breaks, as ``"must be > 0"``, or None (NaN breaks every bound)."""
        rules = (
            ("ge", ">=", operator.ge),
            ("gt", ">", operator.gt),
            ("le", "<=", operator.le),
            ("lt", "<", operator.lt),
        )
        broken = [
            f"{sign} {_number(bound)}"
            for name, sign, holds in rules
            if (bound := getattr(self, name)) is not None and not holds(value, bound)
        ]
        return f"must be {' and '.join(broken)}" if broken else None


class IsPath:
    """Marks a string setting as a file path: `FilePath`."""


class Changeable:
    """Marks a setting that a resumed run may change, because it does not change what the run
    trains: how long it runs, what it logs and where, when it checkpoints (``Annotated[int,
    Range(ge=0), Changeable()]``). A resume that changes any other setting is refused unless the
    user allows that change (``--allow-change KEY``)."""


# A file path setting: relative paths resolve against the job file's folder (a --set value or a
# dict job's: the working directory), so a recorded config.toml holds absolute ones.
FilePath = Annotated[str, IsPath()]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its key, schema (an annotation), default, and who declared it."""

    name: str
    annotation: Any
    default: Any  # MISSING: required
    owner: str

    @property
    def changeable(self) -> bool:
        """Whether a resumed run may change it (`Changeable`; of ``T | None``, on T)."""
        union = typing.get_origin(self.annotation) in (Union, types.UnionType)
        return any(
            typing.get_origin(annotation) is Annotated
            and any(isinstance(rule, Changeable) for rule in typing.get_args(annotation)[1:])
            for annotation in (typing.get_args(self.annotation) if union else (self.annotation,))
        )


def settings_of(declared: Callable[..., Any], owner: str, context: Iterable[str] = ()) -> dict[str, Setting]:
    """The settings of a factory or settings class: its keyword parameters not in `context`."""
    try:
        signature = inspect.signature(declared, eval_str=True)
    except (TypeError, ValueError):
        return {}
    except Exception as error:  # an annotation that does not evaluate (NameError, ...)
        raise ConfigError(f"{owner}: cannot read the settings' annotations: {type(error).__name__}: {error}") from None
    skip = set(context)
    found = {}
    for name, param in signature.parameters.items():
        if name in skip or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        annotation = param.annotation
        if annotation is MISSING:
            annotation = Any if param.default is MISSING or param.default is None else type(param.default)
        found[name] = Setting(name, annotation, param.default, owner)
    return found


def convert(key: str, value: Any, annotation: Any) -> Any:
    """`value` checked against `annotation` and converted (an int where a float is expected,
    a list where a tuple is), or a ConfigError naming `key`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        converted = convert(key, value, args[0])
        for rule in args[1:]:
            if isinstance(rule, Range) and (broken := rule.violation(converted)):
                raise ConfigError(f"{key}: {broken}, got {_shown(value)}")
        return converted
    if annotation is Any or annotation is object:
        return value
    if origin is Literal:
        if value in args and type(value) in {type(arg) for arg in args}:
            return value
        choices = ", ".join(_shown(arg) for arg in args)
        hint = did_you_mean(value, [arg for arg in args if isinstance(arg, str)]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: expected one of {choices}, got {_shown(value)}{hint}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options:
            try:
                return convert(key, value, option)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise ConfigError(f"{key}: expected {type_words(annotation)}, got {_shown(value)}")
    if origin in (list, tuple) or annotation in (list, tuple):
        return _sequence(key, value, origin or annotation, args)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return _table(key, value, args)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    else:
        return value  # an annotation this schema does not read: the factory checks the value itself
    raise ConfigError(f"{key}: expected {type_words(annotation)}, got {_shown(value)}")


def _sequence(key: str, value: Any, kind: type, args: tuple[Any, ...]) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {_shown(value)}")
        items = [convert(f"{key}[{i}]", item, arg) for i, (item, arg) in enumerate(zip(value, args))]
    else:
        item_type = args[0] if args else Any
        items = [convert(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    return kind(items)


def _table(key: str, value: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {_shown(value)}")
    item_type = args[1] if len(args) == 2 else Any
    # TOML's keys are strings, whatever the annotation says of them.
    return {name: convert(f"{key}.{toml_key(name)}", item, item_type) for name, item in value.items()}


def toml_key(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (``"optimizer.lr"``)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def is_path(annotation: Any) -> bool:
    return typing.get_origin(annotation) is Annotated and any(
        isinstance(rule, IsPath) for rule in typing.get_args(annotation)[1:]
    )


def type_words(annotation: Any) -> str:
    """An annotation in words: ``float``, ``a list of int``, ``int or unset``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_words(args[0])
    if origin is Literal:
        return "one of " + ", ".join(_shown(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join("unset" if arg is type(None) else type_words(arg) for arg in args)
    if origin in (list, tuple) or annotation in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        return f"a list of {type_words(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return f"a table of {type_words(args[1])}" if len(args) == 2 and args[1] is not Any else "a table"
    return getattr(annotation, "__name__", str(annotation))


def defaults(settings: Mapping[str, Setting]) -> dict[str, Any]:
    return {name: setting.default for name, setting in settings.items()}


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else repr(bound)


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


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


def _toml_string(value: str) -> str:
    """A TOML basic string: printable ASCII as it is, quotes and backslashes escaped, every other
    character as its code point (a vocabulary holds control characters, and may hold emoji)."""
    characters = []
    for character in value:
        code = ord(character)
        if character in '"\\':
            characters.append("\\" + character)
        elif 0x20 <= code < 0x7F:
            characters.append(character)
        else:
            characters.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
    return '"' + "".join(characters) + '"'


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
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):  # a table inside a section: inline
        return "{" + ", ".join(f"{toml_key(key)} = {_toml_value(item)}" for key, item in value.items()) + "}"
    raise ConfigError(f"value {value!r} cannot be written as TOML")
