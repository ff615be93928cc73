"""Built-in datasets: the tutorial's linear regression (the default), a seeded classification set,
and a user's ``.npz`` or ``.csv`` file; and the files `predict` writes.

A factory returns ``(x, y)`` arrays, or ``{"train": (x, y), "val": (x, y)}`` when a separate
validation file is given; the batching plugin turns them into batches. A user's own
``torch.utils.data.Dataset`` comes in by reference: ``[data] name = "package.module:factory"``.

`evaluate` and `predict` read their ``--data`` file with the data component named after its
suffix (``npz``, ``csv``), with the run's settings for it; `predict` asks for the inputs alone
(``labelled=False``). The ``predictions`` components, also named by suffix, write what `predict`
returns: ``class`` and ``probability`` (classification) or ``value`` (regression).
"""

from __future__ import annotations

import csv as csv_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

import engine

Count = Annotated[int, engine.Range(ge=1)]
NonNegative = Annotated[float, engine.Range(ge=0)]


def linear_regression(
    seed: int, n_samples: Count = 100, weight: float = 2.0, bias: float = 3.0, noise: NonNegative = 0.1
) -> Any:
    """The tutorial's data: ``x ~ N(0, 1)``, ``y = weight * x + bias + noise * N(0, 1)``, shape [N, 1]."""
    rng = np.random.RandomState(seed)  # the same stream as the tutorial's np.random.seed(seed)
    x = rng.randn(n_samples, 1)
    y = weight * x + bias + rng.randn(n_samples, 1) * noise
    return x.astype(np.float32), y.astype(np.float32)


def classification(
    seed: int,
    n_samples: Count = 1000,
    n_features: Count = 20,
    n_classes: Annotated[int, engine.Range(ge=2)] = 4,
    separation: NonNegative = 0.5,
) -> Any:
    """Gaussian blobs: one random centre per class, unit noise; integer class labels."""
    rng = np.random.RandomState(seed)
    centres = rng.randn(n_classes, n_features) * separation
    y = rng.randint(n_classes, size=n_samples)
    x = centres[y] + rng.randn(n_samples, n_features)
    return x.astype(np.float32), y.astype(np.int64)


def npz(
    path: engine.FilePath = "", val_path: engine.FilePath = "", x: str = "x", y: str = "y", labelled: bool = True
) -> Any:
    """Arrays `x` and `y` from a ``.npz`` file (and from `val_path` for validation); `x` alone
    when not `labelled`."""
    if not labelled:
        arrays = np.load(_existing(path, "path"), allow_pickle=False)
        if x not in arrays:
            raise engine.ConfigError(f"data.path: file '{path}' has no array {x!r} (it has: {', '.join(arrays.files)})")
        return arrays[x]

    def load(file: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = np.load(_existing(file, key), allow_pickle=False)
        for name in (x, y):
            if name not in arrays:
                raise engine.ConfigError(
                    f"data.{key}: file '{file}' has no array {name!r} (it has: {', '.join(arrays.files)})"
                )
        return arrays[x], arrays[y]

    return _splits(load, path, val_path)


def csv(
    path: engine.FilePath = "",
    val_path: engine.FilePath = "",
    target: str = "",
    features: tuple[str, ...] = (),
    delimiter: str = ",",
    task: Literal["auto", "regression", "classification"] = "auto",
    labelled: bool = True,
) -> Any:
    """Columns of a ``.csv`` file with a header row: `features` (default: all but `target`) and `target`.

    `task` "auto" reads a target of whole numbers as class indices, any other as regression. When
    not `labelled`, the feature columns alone (all but `target`, if the file has it).
    """
    if not labelled:
        header, body = _csv_rows(path, "path", delimiter)
        wanted = list(features) or [name for name in header if name != target]
        return _columns(path, "path", header, body, wanted).astype(np.float32)
    if not target:
        raise engine.ConfigError("data.target: name the target column of the csv file")

    def load(file: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        header, body = _csv_rows(file, key, delimiter)
        wanted = list(features) or [name for name in header if name != target]
        table = _columns(file, key, header, body, [*wanted, target])
        labels = table[:, -1]
        whole = np.all(labels == np.round(labels))
        if task == "classification" or (task == "auto" and whole):
            if not whole:
                raise engine.ConfigError(f"data.task: '{file}' target {target!r} is not whole numbers")
            labels = labels.astype(np.int64)
        return table[:, :-1].astype(np.float32), labels

    return _splits(load, path, val_path)


def _csv_rows(file: str, key: str, delimiter: str) -> tuple[list[str], list[list[str]]]:
    with open(_existing(file, key), newline="", encoding="utf-8") as handle:
        rows = list(csv_module.reader(handle, delimiter=delimiter))
    if not rows:
        raise engine.ConfigError(f"data.{key}: file '{file}' is empty")
    return rows[0], rows[1:]


def _columns(file: str, key: str, header: list[str], body: list[list[str]], names: list[str]) -> np.ndarray:
    for name in names:
        if name not in header:
            raise engine.ConfigError(f"data: column {name!r} is not in '{file}' (columns: {', '.join(header)})")
    try:
        values = [[float(row[header.index(name)]) for name in names] for row in body]
        return np.array(values, dtype=np.float64).reshape(len(body), len(names))
    except (ValueError, IndexError) as error:
        raise engine.ConfigError(f"data.{key}: '{file}' has a non-numeric or missing value: {error}") from None


def _existing(file: str, key: str) -> Path:
    if not file:
        raise engine.ConfigError(f"data.{key}: give the path of the data file")
    path = Path(file)
    if not path.is_file():
        raise engine.ConfigError(f"data.{key}: file '{file}' does not exist")
    return path


def _splits(load, path: str, val_path: str) -> Any:
    train = load(path, "path")
    return {"train": train, "val": load(val_path, "val_path")} if val_path else train


# --- what `predict` writes ------------------------------------------------------------------------

Columns = Mapping[str, np.ndarray]


def write_npz() -> Callable[[Path, Columns], None]:
    """One array per column, under its name."""

    def write(path: Path, columns: Columns) -> None:
        with engine.runs.replacing(Path(path)) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **columns)

    return write


def write_csv(delimiter: str = ",") -> Callable[[Path, Columns], None]:
    """A header row, then one row per sample: a column of k values becomes ``name_0`` ... ``name_{k-1}``."""

    def write(path: Path, columns: Columns) -> None:
        header, values = [], []
        for name, array in columns.items():
            array = array.reshape(len(array), -1)
            header += [name] if array.shape[1] == 1 else [f"{name}_{i}" for i in range(array.shape[1])]
            values.append(array)
        with (
            engine.runs.replacing(Path(path)) as temporary,
            open(temporary, "w", newline="", encoding="utf-8") as handle,
        ):
            out = csv_module.writer(handle, delimiter=delimiter)
            out.writerow(header)
            for row in zip(*(array.tolist() for array in values)):
                out.writerow([item for part in row for item in part])

    return write


@dataclass(frozen=True)
class Default:
    name: str = "linear_regression"


@engine.hookimpl
def register_settings():
    return {"data": Default}


@engine.hookimpl
def register_components():
    return {
        "data": {"linear_regression": linear_regression, "classification": classification, "npz": npz, "csv": csv},
        "predictions": {"npz": write_npz, "csv": write_csv},
    }
