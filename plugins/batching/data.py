"""What batching checks and reads off the data before it batches it: numbers, one row per
sample, finite values, the task the targets are for, the number of classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

import engine

# What numpy dtype kinds hold, in words, for those that are not numbers.
NOT_NUMBERS = {"U": "str", "S": "bytes", "O": "Python object", "c": "complex", "M": "datetime", "m": "timedelta"}


def tensors(pair: Any, split: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as tensors: float32 inputs, but integer inputs of integer sequence targets ([N, T]
    token ids, for a language model) as int64; integer targets as int64 class indices, float
    targets as [N, k].

    Checked first, naming the `split`: numbers (not strings or objects), one row per sample, as
    many targets as inputs, and every value finite in float32.
    """
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise engine.ConfigError(
            f"data: the data component must return (x, y), a Dataset or {{'train', 'val'}}, got {type(pair).__name__}"
        )
    x, y = (numbers(value, f"the {split} {part}") for value, part in zip(pair, ("inputs", "targets")))
    for tensor, part in ((x, "inputs"), (y, "targets")):
        if tensor.dim() == 0:
            raise engine.ConfigError(f"data: the {split} {part} are one number, not one row per sample")
    if len(x) != len(y):
        raise engine.ConfigError(f"data: the {split} inputs have {len(x)} samples but the targets {len(y)}")
    if len(x) == 0:
        raise engine.ConfigError(f"data: the {split} data is empty")
    if y.is_floating_point():
        y = y.float().reshape(len(y), -1) if y.dim() == 1 else y.float()
    else:
        y = y.long()
    token_ids = not x.is_floating_point() and not y.is_floating_point() and y.dim() > 1 and y[0].numel() > 1
    x = x.long() if token_ids else x.float()
    for tensor, part in ((x, "inputs"), (y, "targets")):
        finite(tensor, f"the {split} {part}")
    return x, y


def numbers(value: Any, what: str) -> torch.Tensor:
    """`value` (a tensor, an array, a list, a number) as a tensor of real numbers, or a ConfigError
    naming `what`."""
    if isinstance(value, torch.Tensor):
        tensor = value
        if tensor.is_complex():
            raise engine.ConfigError(f"data: {what} are complex numbers ({tensor.dtype}); expected real numbers")
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as error:  # ragged nested lists
            raise engine.ConfigError(f"data: {what} are not an array: {engine.one_line(error)}") from None
        if array.dtype.kind in NOT_NUMBERS:
            raise engine.ConfigError(
                f"data: {what} hold {NOT_NUMBERS[array.dtype.kind]} values (dtype {array.dtype}), not numbers"
            )
        if array.dtype.kind == "V":
            raise engine.ConfigError(f"data: {what} are a structured array (dtype {array.dtype}), not numbers")
        tensor = torch.as_tensor(array)
    # torch cannot take max() of uint64; above int64's range the values would wrap around when cast.
    if tensor.dtype == torch.uint64 and tensor.numel() and int(tensor.cpu().numpy().max()) > 2**63 - 1:
        raise engine.ConfigError(f"data: {what} hold integers beyond the int64 range")
    return tensor


def finite(tensor: torch.Tensor, what: str) -> None:
    """A ConfigError naming `what` and the first sample with a value that is not finite."""
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor.reshape(len(tensor), -1)).all(dim=1)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise engine.ConfigError(
            f"data: {what} hold values that are not finite in float32 (NaN, inf, or beyond 3.4e38) in "
            f"{count} sample{'s' if count > 1 else ''}, the first at index {first}"
        )


def class_count(low: int, high: int, n_samples: int) -> int:
    """The number of classes of integer targets from `low` to `high`: class indices are 0 or more
    (-100: ignored, as torch's losses take it), and far fewer than samples."""
    if low < 0 and low != -100:
        raise engine.ConfigError(f"data: class indices must be 0 or more, found {low}")
    # More classes than samples, beyond 65,536 of them: a column of values read as class indices
    # (its output layer alone could not be allocated), not a classification set.
    if high + 1 > max(n_samples, 2**16):
        raise engine.ConfigError(
            f"data: the targets are whole numbers, read as class indices, but the largest ({high}) would make "
            f"{high + 1} classes for {n_samples} samples; if they are values, not classes, set "
            'data.task = "regression"'
        )
    return high + 1


def outputs_of(labels: torch.Tensor, task: str) -> int:
    """The model's outputs for targets `labels` (every split's, as `task` takes them): the target
    width for values, 1 for binary labels, the class count for class indices (per sample, or per
    position of a sequence, where negative targets are ignored positions: padding)."""
    if task == "classification":
        return class_count(int(labels.min()), int(labels.max()), len(labels))
    if task == "sequence":
        return class_count(0, int(labels.max()), labels.numel())
    return labels.shape[-1] if labels.dim() > 1 else 1


# Losses that take one logit per sample, of the probability of class 1: with them, targets that are
# all 0 or 1 (of any dtype: bce_with_logits itself wants floats) are binary labels.
BINARY_LOSSES = frozenset({"bce_with_logits"})


def task_of(y: torch.Tensor, task: str, recorded: str, loss: str = "") -> str:
    """What the targets `y` (of one sample or more: [N, ...]) are: ``data.task``; for "auto", the
    task a trained run recorded (its [inferred] task, when another file is read for it), else
    binary labels when the loss takes them and they are all 0 or 1, values when they are floats,
    class indices when they are integers, one per sample, and a sequence of class indices when
    they are integers, several per sample."""
    if task != "auto":
        return task
    if recorded:
        return recorded
    if loss in BINARY_LOSSES and zeros_and_ones(y):
        return "binary"
    if y.is_floating_point():
        return "regression"
    # Integer targets of more than one value per sample ([N, T]) are a class index per position.
    return "sequence" if y.dim() > 1 and y[0].numel() > 1 else "classification"


def zeros_and_ones(y: torch.Tensor) -> bool:
    """Whether `y` (targets, or one sample's) holds labels 0 and 1 only, one per sample."""
    flat = y.reshape(len(y), -1) if y.dim() else y.reshape(1, 1)
    return flat.numel() > 0 and flat.shape[1] == 1 and bool(((flat == 0) | (flat == 1)).all())


def as_task(y: torch.Tensor, task: str, split: str) -> torch.Tensor:
    """The targets of `split` as `task` takes them: values as float [N, k], class indices as int64
    [N], binary labels as float [N, 1] of 0 and 1; a ConfigError naming data.task otherwise."""
    if task == "regression":
        return y.float().reshape(len(y), -1)
    if task == "sequence":
        whole_numbers(y, task, split)
        return y.long()
    flat = y.reshape(len(y), -1)
    if flat.shape[1] != 1:
        raise engine.ConfigError(
            f"data.task = {task!r}: the {split} targets have {flat.shape[1]} columns; labels are one column"
        )
    flat = flat[:, 0]
    whole_numbers(flat, task, split)
    if task == "binary":
        outside = (flat != 0) & (flat != 1)
        if outside.any():
            raise engine.ConfigError(
                f"data.task = 'binary': the {split} targets hold {float(flat[outside][0]):g}; binary labels are "
                '0 and 1 (for more classes: data.task = "classification")'
            )
        return flat.float().reshape(-1, 1)
    return flat.long()


def whole_numbers(y: torch.Tensor, task: str, split: str) -> None:
    """A ConfigError naming data.task when the `split` targets `y` are not whole numbers."""
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise engine.ConfigError(
            f"data.task = {task!r}: the {split} targets are not whole numbers "
            f'(e.g. {float(y[y != y.round()][0])}); for values set data.task = "regression"'
        )


def same_rows(
    train: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor], split: str = "validation"
) -> None:
    """The samples of a held-out `split` must have the training samples' shapes and kind of target."""
    for part, a, b in (("inputs", train[0], held[0]), ("targets", train[1], held[1])):
        if a.shape[1:] != b.shape[1:]:
            raise engine.ConfigError(
                f"data: the {split} {part} have samples of shape {tuple(b.shape[1:])}, "
                f"the training {part} {tuple(a.shape[1:])}"
            )
    if train[1].is_floating_point() != held[1].is_floating_point():
        kinds = ("values", "class indices") if train[1].is_floating_point() else ("class indices", "values")
        raise engine.ConfigError(f"data: the training targets are {kinds[0]} but the {split} targets {kinds[1]}")


def pair_of(sample: Any, target_key: str, index: int) -> tuple[Any, Any]:
    """A Dataset's sample as (input, target): an (input, target) pair, or a dict whose `target_key`
    item is the target and whose other items are the inputs (``input_ids``, ``attention_mask``)."""
    if isinstance(sample, Mapping):
        if target_key not in sample:
            raise engine.ConfigError(
                f"data.target_key: sample {index} of the Dataset is a dict without {target_key!r} "
                f"(it has: {', '.join(map(str, sample))}); name the key of its targets"
            )
        return {key: value for key, value in sample.items() if key != target_key}, sample[target_key]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise engine.ConfigError(
            f"data: sample {index} of the Dataset is a {type(sample).__name__}, not an (input, target) pair or a dict"
        )
    return sample[0], sample[1]


def sample_tensors(dataset: Dataset, index: int, target_key: str = "labels") -> tuple[Any, torch.Tensor]:
    """Sample `index` of a Dataset as tensors of numbers (its inputs: one tensor, or a dict of them),
    or a ConfigError saying what it is."""
    x, y = pair_of(dataset[index], target_key, index)
    parts = {f"input {key!r}": value for key, value in x.items()} if isinstance(x, Mapping) else {"input": x}
    tensors = {}
    for part, value in [*parts.items(), ("target", y)]:
        if not isinstance(value, (torch.Tensor, np.ndarray, np.generic, int, float)):
            kind = type(value)
            raise engine.ConfigError(
                f"data: the {part} of sample {index} of the Dataset is a {kind.__module__}.{kind.__qualname__}, "
                "not a tensor, array or number (convert it in the Dataset)"
            )
        tensors[part] = numbers(value, f"the {part} of sample {index} of the Dataset")
    y = tensors.pop("target")
    if isinstance(x, Mapping):
        return {key: tensors[f"input {key!r}"] for key in x}, y
    return tensors["input"], y


def named_classes(dataset: Dataset) -> Any:
    """The ``classes`` a Dataset names (torchvision's do), looked up through the Subsets a split makes."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "classes"):
        dataset = dataset.dataset
    return getattr(dataset, "classes", None)
