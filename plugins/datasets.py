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
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

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
    path: engine.FilePath = "",
    val_path: engine.FilePath = "",
    test_path: engine.FilePath = "",
    x: str = "x",
    y: str = "y",
    labelled: bool = True,
) -> Any:
    """Arrays `x` and `y` from a ``.npz`` file (and from `val_path` for validation, `test_path`
    for the test at the end); `x` alone when not `labelled`."""
    if not labelled:
        return _npz_arrays(path, "path", (x,))[0]
    return _splits(lambda file, key: tuple(_npz_arrays(file, key, (x, y))), path, val_path, test_path)


def _npz_arrays(file: str, key: str, names: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays `names` of an npz file, checked: a readable file of named numeric arrays."""
    try:
        arrays = np.load(_existing(file, key), allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise engine.ConfigError(
            f"data.{key}: '{file}' is not a readable .npz file: {engine.one_line(error)}"
        ) from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise engine.ConfigError(f"data.{key}: '{file}' holds one array, not named arrays (save it with np.savez)")
    with arrays:
        for name in names:
            if name not in arrays:
                raise engine.ConfigError(
                    f"data.{key}: file '{file}' has no array {name!r} (it has: {', '.join(arrays.files)})"
                )
        loaded = []
        for name in names:
            try:
                array = arrays[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # pickled objects, a cut file
                raise engine.ConfigError(
                    f"data.{key}: array {name!r} of '{file}' cannot be read: {engine.one_line(error)}"
                ) from None
            if array.dtype.kind not in "biuf":
                raise engine.ConfigError(
                    f"data.{key}: array {name!r} of '{file}' holds {array.dtype} values, not numbers"
                )
            loaded.append(array)
    return loaded


def csv(
    path: engine.FilePath = "",
    val_path: engine.FilePath = "",
    test_path: engine.FilePath = "",
    target: str = "",
    features: tuple[str, ...] = (),
    delimiter: str = ",",
    labelled: bool = True,
) -> Any:
    """Columns of a ``.csv`` file with a header row: `features` (default: all but `target`) and `target`.

    Text has no dtype, so the target's is chosen over every file read (train, validation, test):
    whole numbers of 0 or more with few distinct values (`looks_like_classes`) become class
    indices, anything else values; ``data.task`` overrides it either way. Blank lines are
    skipped; a row with more or fewer values than the header is an error. When not `labelled`,
    the feature columns alone (all but `target`, if the file has it).
    """
    if not labelled:
        header, rows = _read_csv(path, "path", delimiter)
        wanted = list(features) or [name for name in header if name != target]
        return _columns(path, "path", header, rows, wanted).astype(np.float32)
    if not target:
        raise engine.ConfigError("data.target: name the target column of the csv file")
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise engine.ConfigError(f"data.delimiter: expected one character, not a quote or newline, got {delimiter!r}")

    def load(file: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        header, rows = _read_csv(file, key, delimiter)
        wanted = list(features) or [name for name in header if name != target]
        table = _columns(file, key, header, rows, [*wanted, target])
        return table[:, :-1].astype(np.float32), table[:, -1]

    splits = _splits(load, path, val_path, test_path)
    parts = splits if isinstance(splits, dict) else {"train": splits}
    if looks_like_classes(np.concatenate([labels for _, labels in parts.values()])):
        parts = {name: (inputs, labels.astype(np.int64)) for name, (inputs, labels) in parts.items()}
    return parts if isinstance(splits, dict) else parts["train"]


# Whole-number targets with more distinct values than this, or than a fifth of the rows, are read
# as values: the diabetes set's disease progression (25 to 346, 214 values in 442 rows) is not 347
# classes.
MAX_CLASSES_FROM_TEXT = 100


def looks_like_classes(labels: np.ndarray) -> bool:
    """Whether targets read from text are class indices: whole numbers of 0 or more, with at most
    `MAX_CLASSES_FROM_TEXT` distinct values and at most a fifth as many as rows (each class seen
    five times on average)."""
    if not (np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)) and np.all(labels >= 0)):
        return False
    distinct = len(np.unique(labels))
    return distinct <= max(2, min(MAX_CLASSES_FROM_TEXT, len(labels) // 5))


def _read_csv(file: str, key: str, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the rows (with their line numbers) of a csv file, checked: a header of
    distinct names, as many values in each row; blank lines are skipped."""
    rows = []
    try:
        # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first name.
        with open(_existing(file, key), newline="", encoding="utf-8-sig") as handle:
            reader = csv_module.reader(handle, delimiter=delimiter)
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as error:
        raise engine.ConfigError(f"data.{key}: '{file}' is not UTF-8 text: {engine.one_line(error)}") from None
    except csv_module.Error as error:
        raise engine.ConfigError(f"data.{key}: '{file}' line {reader.line_num}: {error}") from None
    if not rows:
        raise engine.ConfigError(f"data.{key}: file '{file}' is empty")
    (_, header), body = rows[0], rows[1:]
    header = [name.strip() for name in header]
    if all(_is_number(name) for name in header):
        raise engine.ConfigError(
            f"data.{key}: the first line of '{file}' is numbers, not a header: add a line naming the columns"
        )
    for index, name in enumerate(header):
        if not name:
            raise engine.ConfigError(f"data.{key}: column {index + 1} of the header of '{file}' has no name")
        if header.index(name) != index:
            raise engine.ConfigError(f"data.{key}: the header of '{file}' names column {name!r} twice")
    for line, row in body:
        if len(row) != len(header):
            raise engine.ConfigError(
                f"data.{key}: '{file}' line {line} has {len(row)} values, but the header names {len(header)} columns"
            )
    if not body:
        raise engine.ConfigError(f"data.{key}: '{file}' has a header but no rows")
    return header, body


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _columns(file: str, key: str, header: list[str], rows: list[tuple[int, list[str]]], names: list[str]) -> np.ndarray:
    """The `names` columns of `rows` as numbers; a missing column or a cell that is not a number is
    a ConfigError naming the file, line and column."""
    for name in names:
        if name not in header:
            raise engine.ConfigError(f"data: column {name!r} is not in '{file}' (columns: {', '.join(header)})")
    columns = [header.index(name) for name in names]
    table = np.empty((len(rows), len(columns)))
    for i, (line, row) in enumerate(rows):
        for j, column in enumerate(columns):
            try:
                table[i, j] = float(row[column])
            except ValueError:
                cell = row[column].strip()
                what = "is empty" if not cell else f"is {cell!r}, not a number"
                raise engine.ConfigError(
                    f"data.{key}: '{file}' line {line}, column {header[column]!r} {what}"
                ) from None
    return table


def _existing(file: str, key: str) -> Path:
    if not file:
        raise engine.ConfigError(f"data.{key}: give the path of the data file")
    path = Path(file)
    if not path.is_file():
        raise engine.ConfigError(f"data.{key}: file '{file}' does not exist")
    return path


def _splits(load, path: str, val_path: str, test_path: str) -> Any:
    """What `load` reads of each file given: the training data alone, or ``{"train", "val", "test"}``."""
    train = load(path, "path")
    if not (val_path or test_path):
        return train
    held = {"val": (val_path, "val_path"), "test": (test_path, "test_path")}
    return {"train": train, **{name: load(file, key) for name, (file, key) in held.items() if file}}


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


@engine.hookimpl
def register_components():
    return {
        "default": {"data": "linear_regression"},
        "data": {"linear_regression": linear_regression, "classification": classification, "npz": npz, "csv": csv},
        "predictions": {"npz": write_npz, "csv": write_csv},
    }
