"""The job config: TOML in, defaults and ``--set`` overrides merged, every key validated.

A config is resolved entirely before training starts: unknown sections and keys, values that do
not fit a setting's schema (engine/schema.py) and unknown component names are errors naming the
key, with the name probably meant.
"""

from __future__ import annotations

import tomllib
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from .components import CORE_KINDS, OPTIONAL_KINDS, UNCONFIGURED_KINDS
from .errors import ConfigError, suggest
from .plugins import Plugins, dotted, is_plugin_file, make_plugins, plugin_target
from .runs import valid_run_name
from .schema import MISSING, Changeable, Range, Setting, convert, is_path, settings_of


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """The core's top-level settings."""

    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 42
    # The run ends when either ends (engine/steps.py); neither given: DEFAULT_EPOCHS epochs. A
    # resumed run may run longer or shorter.
    epochs: Annotated[int, Range(ge=1), Changeable()] | None = None
    max_steps: Annotated[int, Range(ge=1), Changeable()] | None = None  # optimizer steps
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    plugins: tuple[str, ...] = ()  # plugin modules to load, as --plugin does
    grad_accumulation: Annotated[int, Range(ge=1)] = 1
    val_every: Annotated[int, Range(ge=0)] = 1  # epochs between validations; 0: none by epochs
    val_every_steps: Annotated[int, Range(ge=0)] = 0  # optimizer steps between validations; 0: none by steps
    run_name: Annotated[str, Changeable()] = ""  # one plain path component; empty: a timestamp
    runs_dir: Annotated[str, Changeable()] = "runs"
    # "auto": continue the run named run_name if it has a checkpoint
    resume: Annotated[Literal["", "auto"], Changeable()] = ""


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: the logging points, where the step losses are read back and checked."""

    # Epochs, and optimizer steps, between logging points; both 0: a tenth of the run (in steps
    # when max_steps is set, else in epochs).
    every: Annotated[int, Range(ge=0), Changeable()] = 0
    every_steps: Annotated[int, Range(ge=0), Changeable()] = 0
    train_metrics: Annotated[bool, Changeable()] = True  # compute_metrics in each train step, as train_<name>


@dataclass(frozen=True, slots=True)
class InferredSettings:
    """``[inferred]``: what the run inferred from its data, recorded in config.toml so that the
    model can be rebuilt without the data. Unset (0, "") in a job; set, the data must match it."""

    n_features: Annotated[int, Range(ge=0)] = 0
    n_outputs: Annotated[int, Range(ge=0)] = 0
    task: Literal["", "regression", "classification", "binary", "sequence"] = ""
    threshold: Annotated[float, Range(gt=0, lt=1)] = 0.5  # binary: the decision threshold the run chose
    input_transform: str = ""  # the input_transform component the model applies first ("": none)
    input_shape: tuple[Annotated[int, Range(ge=1)], ...] = ()  # one input sample's (C, H, W for images)
    classes: tuple[str, ...] = ()  # the names of the classes or tokens, when the data names them (a vocabulary)


@dataclass(frozen=True, slots=True)
class ModelCallSettings:
    """``[model]``, beside its component's settings: how the train step, validation and the
    after-training tools call the model and read what it returns (engine/step.py, `model_call`)."""

    # Where the logits are in what the model returns: "" (it returns them), an index ("0": a
    # tuple's first item), or a key or attribute ("logits": a dict's, a dataclass's).
    output: str = ""
    # How the model takes the targets: "" (it does not: the [loss] component computes the loss),
    # "argument" (the second positional argument: model(x, y)), or a keyword ("labels": model(x, labels=y)).
    targets: str = ""


DEFAULT_EPOCHS = 1000  # when the job counts its run in neither epochs nor max_steps
CORE_SECTIONS = {"": CoreSettings, "log": LogSettings, "inferred": InferredSettings, "model": ModelCallSettings}


class Override:
    """A ``--set`` value: parsed as TOML, with its text kept for settings that take strings."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any) -> None:
        self.text, self.value = text, value


def plain(value: Any, annotation: Any = Any) -> Any:
    """The value of a setting as given: an override's text where the setting takes a string."""
    if isinstance(value, Override):
        # A quoted TOML string (--set loss.name='"huber"') is already its value, quotes removed.
        return value.text if _takes_string(annotation) and not isinstance(value.value, str) else value.value
    return value


def _takes_string(annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _takes_string(args[0])
    if origin is Literal:
        return all(isinstance(arg, str) for arg in args)
    if origin is not None and type(None) in args:  # Optional[str]
        return any(_takes_string(arg) for arg in args if arg is not type(None))
    return annotation is str


class Section(Mapping[str, Any]):
    """One resolved, read-only config section."""

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

    def component_settings(self) -> dict[str, Any]:
        return {key: value for key, value in self._values.items() if key in self.params}

    def __repr__(self) -> str:
        return f"Section({self._values!r})"


class Config(Section):
    """The resolved config: top-level keys and one :class:`Section` per section."""

    def to_dict(self) -> dict[str, Any]:
        return {key: dict(value) if isinstance(value, Section) else value for key, value in self.items()}

    def replace(self, section: str, values: Mapping[str, Any]) -> Config:
        """A copy with some keys of `section` set to `values`."""
        replaced = dict(self._values)
        replaced[section] = Section({**self[section], **values}, self[section].params)
        return Config(replaced)


def load_job(path: str | Path) -> dict[str, Any]:
    """Read a TOML job file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad writes one) is not TOML
    except FileNotFoundError:
        raise ConfigError(f"job file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"job file '{path}' cannot be read: {error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"job file '{path}' is not valid TOML: {error}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"job file '{path}' nests arrays or tables too deeply to read") from None


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
            value = Override(text, text)  # a bare word: a string
        except RecursionError:
            raise ConfigError(f"--set {key}: the value nests arrays or tables too deeply to read") from None
        section, _, name = key.rpartition(".")
        if section:
            target = merged.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {section!r} is a setting, not a section")
            target[name] = value
        else:
            merged[name] = value
    return merged


def declared_settings(plugins: Plugins) -> dict[str, dict[str, Setting]]:
    """Every declared setting by section: the core's, then each plugin's."""
    settings = {section: settings_of(declared, "core") for section, declared in CORE_SECTIONS.items()}
    for section, keys in plugins.settings.items():
        for key, setting in keys.items():
            if key in settings.get(section, {}):
                raise ConfigError(
                    f"plugin {setting.owner!r} declares setting {dotted(section, key)}, which the core owns"
                )
            settings.setdefault(section, {})[key] = setting
    return settings


def resolve(job: Mapping[str, Any], plugins: Plugins, base: Path | None = None) -> Config:
    """Validate `job` against every declared setting and component, filling in defaults.

    Relative file paths resolve against `base` (the job file's folder), or for ``--set`` values
    and without a base, the working directory.
    """
    settings = declared_settings(plugins)
    kinds = [kind for kind in dict.fromkeys([*CORE_KINDS, *plugins.components]) if kind not in UNCONFIGURED_KINDS]
    sections = list(dict.fromkeys([*kinds, *(s for s in settings if s)]))

    top = {key: value for key, value in job.items() if key not in sections and not isinstance(value, Mapping)}
    for key, value in job.items():
        if isinstance(value, Mapping) and key not in sections:
            raise ConfigError(f"unknown section [{key}]{suggest(key, sections)}")
        if key in sections and not isinstance(value, Mapping):
            raise ConfigError(f"{key}: is a section; set its keys ([{key}] or --set {key}.KEY=VALUE)")
    resolved: dict[str, Any] = _resolve_keys("", top, settings[""], base)
    if resolved["run_name"] and not valid_run_name(resolved["run_name"]):
        raise ConfigError(
            f"run_name: {resolved['run_name']!r} is not one plain name (letters, digits, . _ - + = @; "
            "no path separator, not starting with a dot)"
        )
    if resolved["epochs"] is None and resolved["max_steps"] is None:
        resolved["epochs"] = DEFAULT_EPOCHS
    device = resolved["device"]
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")

    for section in sections:
        given = dict(job.get(section, {}))
        declared = dict(settings.get(section, {}))
        params: dict[str, Setting] = {}
        if section in kinds:
            name = _component_name(section, given, plugins)
            if name is not None:
                params = _component_params(section, name, declared, plugins)
            given["name"] = name
            declared["name"] = Setting("name", str | None, name, "core")
        values = _resolve_keys(section, given, {**declared, **params}, base)
        _check(section, values, plugins)
        resolved[section] = Section(values, params)
    return Config(resolved)


def changeable(config: Config, plugins: Plugins) -> set[str]:
    """The dotted keys of `config` that a resumed run may change (`engine.Changeable`): the
    declared settings and the chosen components' parameters so marked."""
    keys = {
        dotted(section, key)
        for section, declared in declared_settings(plugins).items()
        for key, setting in declared.items()
        if setting.changeable
    }
    for section, values in config.items():
        if isinstance(values, Section) and values.params and isinstance(values.get("name"), str):
            params = _component_params(section, values["name"], {}, plugins)
            keys |= {dotted(section, key) for key, setting in params.items() if setting.changeable}
    return keys


def _check(section: str, values: Mapping[str, Any], plugins: Plugins) -> None:
    """Call each settings class of `section` with its resolved values: one that raises
    ValueError (a package an enabled feature needs is missing, two keys disagree) refuses the
    config before anything is built or written."""
    for settings_class, owner, keys in plugins.checks.get(section, []):
        try:
            settings_class(**{key: values[key] for key in keys})
        except ValueError as error:
            raise ConfigError(f"[{section}] (plugin {owner!r}): {error}") from None


def _component_name(kind: str, given: Mapping[str, Any], plugins: Plugins) -> str | None:
    """The component the `[kind]` section names, else the default a plugin declared."""
    name = plain(given.get("name", plugins.default(kind)), str)
    if name is None and kind in CORE_KINDS and kind not in OPTIONAL_KINDS:
        choices = ", ".join(sorted(plugins.components.get(kind, {})))
        if not choices:
            raise ConfigError(f"{kind}.name: required, and no plugin provides one (is the one that does blocked?)")
        raise ConfigError(f"{kind}.name: required, no plugin sets a default (choose one of: {choices})")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{kind}.name: expected a string, got {name!r}")
    return name


def _component_params(kind: str, name: str, declared: Mapping[str, Setting], plugins: Plugins) -> dict[str, Setting]:
    """The settings of component `name`: its factory's parameters that are not run context."""
    params = settings_of(plugins.component(kind, name).factory, f"{kind} {name!r}", CORE_KINDS.get(kind, ()))
    for key in params:
        if key in declared and key != "name":
            raise ConfigError(f"{kind}.{key}: both a setting of plugin {declared[key].owner!r} and of {kind} {name!r}")
    return params


def _resolve_keys(
    section: str, given: Mapping[str, Any], declared: Mapping[str, Setting], base: Path | None
) -> dict[str, Any]:
    for key in given:
        if key not in declared:
            where = f"[{section}]" if section else "the top level"
            raise ConfigError(f"{dotted(section, key)}: unknown key in {where}{suggest(key, declared)}")
    values = {}
    for key, setting in declared.items():
        if key not in given:
            if setting.default is MISSING:
                raise ConfigError(f"{dotted(section, key)}: required setting is missing")
            values[key] = setting.default
        else:
            value = convert(dotted(section, key), plain(given[key], setting.annotation), setting.annotation)
            if value and is_path(setting.annotation):
                # --set values are relative to where the command runs, job-file values to the file.
                origin = Path.cwd() if isinstance(given[key], Override) or base is None else base
                value = str((origin / Path(value).expanduser()).absolute())
            values[key] = value
    return values


def load_config(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    *,
    imports: bool = True,
) -> tuple[Config, Plugins]:
    """Resolve a job (a dict, a TOML path, a Config, or None for the defaults) and its plugins.

    `imports` False refuses a job that imports code (plugin modules, ``module:attr`` component
    names) before anything is imported; what `overrides` and `plugins` name is the caller's own.
    """
    merged, base = merged_job(job, overrides)
    if not imports:
        for reference in references(merged):
            if not reference.given:
                raise ConfigError(
                    f"{reference.key}: {reference.value!r} imports code, which --no-imports forbids "
                    "(a job file that imports code must be trusted like a script)"
                )
    listed = [recorded(name, base) for name in convert("plugins", plain(merged.get("plugins", ())), tuple[str, ...])]
    extra = [*plugins]
    extra += [name for name in listed if name not in {recorded(item) for item in extra if isinstance(item, str)}]
    found = make_plugins(extra, blocked)
    # The config records every plugin module a rerun needs: the job's and --plugin's, files by
    # absolute path. (Plugin objects passed from Python cannot be recorded.)
    listed += [recorded(item) for item in plugins if isinstance(item, str) and recorded(item) not in listed]
    merged["plugins"] = listed
    try:
        return resolve(merged, found, base), found
    except ConfigError:
        if not found.add_blocked_settings():  # a setting of a blocked plugin? known, and unused
            raise
        return resolve(merged, found, base), found


def merged_job(
    job: Mapping[str, Any] | str | Path | Config | None, overrides: Iterable[str] = ()
) -> tuple[dict[str, Any], Path | None]:
    """The job as a dict with `overrides` applied, and the folder its relative paths start from."""
    base = None
    if isinstance(job, Config):
        job = job.to_dict()
    elif isinstance(job, (str, Path)):
        base = Path(job).absolute().parent
        job = load_job(job)
    return apply_overrides(job or {}, overrides), base


@dataclass(frozen=True, slots=True)
class Reference:
    """Code a job imports: a plugin module or a ``module:attr`` component, and the key naming it."""

    key: str  # "plugins[0]", "model.name"
    value: str
    given: bool  # given on the command line (--set), not by the job file


def references(job: Mapping[str, Any]) -> list[Reference]:
    """The code a merged job (`merged_job`) imports, in the order it is imported, read without
    importing anything."""
    found = []
    listed = job.get("plugins", ())
    given = isinstance(listed, Override)
    for index, name in enumerate(plain(listed) if isinstance(plain(listed), (list, tuple)) else ()):
        if isinstance(name, str):
            found.append(Reference(f"plugins[{index}]", name, given))
    for section, values in job.items():
        # A component's name, and the one a run records outside a `name` key: the input transform
        # its loaders chose, which `engine.load` builds.
        for key in ("name", "input_transform") if section == "inferred" else ("name",):
            name = values.get(key) if isinstance(values, Mapping) else None
            if isinstance(plain(name, str), str) and ":" in plain(name, str):
                found.append(Reference(f"{section}.{key}", plain(name, str), isinstance(name, Override)))
    return found


def recorded(plugin: str, base: Path | None = None) -> str:
    """A plugin module as the config records it: a module by name, a file by its absolute path
    (relative to `base`, the job file's folder, or to the working directory)."""
    if not is_plugin_file(plugin):
        return plugin
    target, attribute = plugin_target(plugin)
    path = str(((base or Path.cwd()) / Path(target).expanduser()).absolute())
    return f"{path}:{attribute}" if attribute else path
