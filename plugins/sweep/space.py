"""``[sweep.space]``: the settings a sweep searches, one dimension per dotted key as ``--set`` takes
it, and the ``--set`` overrides that turn a trial's parameters into its run.

    "optimizer.lr" = { log = [1e-4, 1e-1] }            a float, uniform in its logarithm
    "optimizer.weight_decay" = { range = [0.0, 0.1] }  a float, uniform (step: on a grid)
    "data.batch_size" = { int = [16, 128], step = 16 } an integer (step: 1 unless given)
    "model.hidden" = { choice = [[64], [128, 128]] }   one of the values, any TOML value

What a dimension can produce is checked against the setting's schema before the first trial
(`check_values`): its bounds, or each of its choices, as a ``--set`` of that value.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import engine

KINDS = ("log", "range", "int", "choice")
# Set by the sweep itself for each trial: searching them would break the sweep's bookkeeping.
RESERVED = ("run_name", "runs_dir", "resume", "plugins")
FORMS = "log = [low, high], range = [low, high], int = [low, high] or choice = [values] (step with range or int)"


@dataclass(frozen=True, slots=True)
class Dimension:
    """One searched setting."""

    key: str  # dotted, as --set takes it: "optimizer.lr"
    kind: str  # one of KINDS
    low: float = 0.0
    high: float = 0.0  # the largest value it produces (with a step: the last point of the grid)
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def where(self) -> str:
        """How an error names it: ``sweep.space."optimizer.lr"``."""
        return f"sweep.space.{toml_key(self.key)}"

    def categories(self) -> list[Any]:
        """Optuna's categories for a choice: the values, or their TOML text where one is not a
        number, string or boolean (Optuna stores only those)."""
        if all(isinstance(choice, (str, int, float, bool)) for choice in self.choices):
            return list(self.choices)
        return [toml_text(choice) for choice in self.choices]

    def distribution(self) -> Any:
        """The Optuna distribution the sampler draws from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(self.categories())
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.kind == "log", step=self.step)

    def value(self, parameter: Any) -> Any:
        """The setting's value for Optuna's parameter."""
        if self.kind == "choice":
            return self.choices[self.categories().index(parameter)]
        return int(parameter) if self.kind == "int" else float(parameter)

    def extremes(self) -> list[Any]:
        """What the schema must accept for every value of the dimension to fit: its bounds (a
        setting's bounds are a range, so its ends are enough), or each choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        """Every value, where they are finitely many (choice, int, range with step); else None."""
        if self.kind == "choice":
            return self.categories()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "range" and self.step is not None:
            points = round((self.high - self.low) / self.step)
            return [float(f"{self.low + i * self.step:.12g}") for i in range(points + 1)]
        return None


def toml_key(name: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (``"optimizer.lr"``)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def toml_text(value: Any) -> str:
    """`value` as TOML writes it, the text of a ``--set``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, float) else json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_text(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_key(key)} = {toml_text(item)}" for key, item in value.items()) + "}"
    raise engine.ConfigError(f"a value of type {type(value).__name__} cannot be searched ({value!r})")


def parse_space(space: Mapping[str, Mapping[str, Any]] | None) -> list[Dimension]:
    """The dimensions of ``[sweep.space]``, in the job's order; a ConfigError naming the entry
    that is not one."""
    return [dimension(key, entry) for key, entry in (space or {}).items()]


def dimension(key: str, entry: Mapping[str, Any]) -> Dimension:
    where = f"sweep.space.{toml_key(key)}"
    section, _, name = key.rpartition(".")
    if not name or "." in section or not all(part.isidentifier() for part in key.split(".")):
        raise engine.ConfigError(f"{where}: not a setting's key (section.key or key, as --set takes it)")
    if key in RESERVED or section == "sweep":
        raise engine.ConfigError(f"{where}: the sweep sets it for each trial; it cannot be searched")
    kinds = [kind for kind in KINDS if kind in entry]
    unknown = [part for part in entry if part not in (*KINDS, "step")]
    if len(kinds) != 1 or unknown:
        said = f"unknown key {unknown[0]!r}" if unknown else "give exactly one form"
        raise engine.ConfigError(f"{where}: {said}: a dimension is {FORMS}")
    kind = kinds[0]
    if kind == "choice":
        return _choice(key, where, entry)
    return _bounded(key, where, kind, entry)


def _choice(key: str, where: str, entry: Mapping[str, Any]) -> Dimension:
    choices = entry["choice"]
    if "step" in entry:
        raise engine.ConfigError(f"{where}: step goes with range or int, not choice")
    if not isinstance(choices, list) or not choices:
        raise engine.ConfigError(f"{where}: choice takes a list of one value or more, got {choices!r}")
    texts = [toml_text(choice) for choice in choices]
    repeated = sorted({text for text in texts if texts.count(text) > 1})
    if repeated:
        raise engine.ConfigError(f"{where}: choice lists {repeated[0]} twice")
    return Dimension(key, "choice", choices=tuple(choices))


def _bounded(key: str, where: str, kind: str, entry: Mapping[str, Any]) -> Dimension:
    bounds, step = entry[kind], entry.get("step")
    number = int if kind == "int" else (int, float)
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is(value, number) for value in bounds)):
        words = "integers" if kind == "int" else "numbers"
        raise engine.ConfigError(f"{where}: {kind} takes [low, high], two {words}, got {bounds!r}")
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise engine.ConfigError(f"{where}: {kind} = [{low}, {high}]: low must be below high")
    if kind == "log" and low <= 0:
        raise engine.ConfigError(f"{where}: log = [{low}, {high}]: a log range must be above 0")
    if step is not None:
        if kind == "log":
            raise engine.ConfigError(f"{where}: step goes with range or int, not log")
        if not _is(step, number) or not step > 0 or step > high - low:
            raise engine.ConfigError(f"{where}: step must be above 0 and at most high - low, got {step!r}")
        high = low + math.floor((high - low) / step + 1e-9) * step  # the grid's last point
    if kind == "int":
        return Dimension(key, kind, low, high, step)
    return Dimension(key, kind, float(low), float(high), float(step) if step is not None else None)


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def overrides(dimensions: Sequence[Dimension], parameters: Mapping[str, Any]) -> list[str]:
    """The ``--set`` overrides of a trial with Optuna's `parameters`."""
    return [f"{d.key}={toml_text(d.value(parameters[d.key]))}" for d in dimensions if d.key in parameters]


def check_values(dimensions: Iterable[Dimension], load: Any) -> None:
    """Every value each dimension can produce, checked against its setting's schema as a ``--set``
    of it: ``load(overrides)`` resolves the job with them (`engine.load_config`). A ConfigError
    names the dimension, the value and what the setting says."""
    for dimension in dimensions:
        for value in dimension.extremes():
            try:
                load([f"{dimension.key}={toml_text(value)}"])
            except engine.ConfigError as error:
                raise engine.ConfigError(f"{dimension.where}: {toml_text(value)} does not fit: {error}") from None


def grid(dimensions: Sequence[Dimension]) -> list[dict[str, Any]] | None:
    """Every point of the grid the dimensions span, as Optuna parameters; None when one of them
    is not finite."""
    values = [dimension.grid() for dimension in dimensions]
    if any(points is None for points in values):
        return None
    keys = [dimension.key for dimension in dimensions]
    return [dict(zip(keys, point)) for point in itertools.product(*values)]
