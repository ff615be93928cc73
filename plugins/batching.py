"""Turns what the data component returned into train and validation batches (`build_loaders`).

In-memory tensors are moved to the device once and batched by slicing one seeded permutation per
epoch: no per-sample Python work, unlike a DataLoader. A ``torch.utils.data.Dataset`` goes through
``DataLoader``. Either way the order of epoch `e` depends only on (seed, e), so a resumed run can
start at any batch.

Before batching: the target's task (``data.task``: class indices, values, or 0/1 labels for
``binary``), the validation and test splits (``val_fraction``, ``test_fraction``), drawn with
``split_seed`` (not ``seed``: changing the seed of the training does not move the split) and, for
classification, stratified by class (in-memory data), and ``standardize``: each input feature
scaled by the mean and standard deviation of the training split alone, applied to every split
and recorded as the loaders' `engine.Standardize`, which the run saves with the model.

With several processes, ``data.batch_size`` is the global batch (it must divide by the number of
processes), and each process takes its own contiguous piece of every batch of the same epoch
order (`Part`), so that together they see the batches one process would; an epoch's last batch
may split unevenly (`Loaders.shares`). The validation data is cut into one piece per process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

import engine

# How many samples of a Dataset `DatasetLoaders.sample` reads for the setup chain's check.
SAMPLE_SIZE = 8


@dataclass(frozen=True)
class Batching:
    """The ``[data]`` settings of batching, beside the dataset's own."""

    batch_size: Annotated[int, engine.Range(ge=0)] = 0  # 0: the whole training set in one batch (the tutorial)
    shuffle: bool = True
    drop_last: bool = False
    val_fraction: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0
    test_fraction: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0  # held out; evaluated once, at the end
    split_seed: Annotated[int, engine.Range(ge=0)] = 0  # draws the validation and test splits
    stratify: bool = True  # classification: each split keeps the class proportions (in-memory data)
    standardize: bool = False  # inputs scaled by the training split's mean and standard deviation
    # auto: integer targets are class indices, others values; binary: 0/1 labels (bce_with_logits)
    task: Literal["auto", "regression", "classification", "binary"] = "auto"
    # binary: a probability of class 1 above it predicts 1 (accuracy, the metrics, predict)
    threshold: Annotated[float, engine.Range(gt=0, lt=1)] = 0.5
    num_workers: Annotated[int, engine.Range(ge=0)] = 0
    pin_memory: bool = False


@engine.hookimpl
def register_settings():
    return {"data": Batching}


@engine.hookimpl(trylast=True)
def build_loaders(
    data: Any, config: engine.Config, seed: int, device: torch.device, rank: int, world_size: int
) -> engine.Loaders:
    settings = config["data"]
    if isinstance(data, Mapping):
        train, val, test = data["train"], data.get("val"), data.get("test")
    else:
        train, val, test = data, None, None
    if isinstance(train, Dataset):
        return DatasetLoaders(train, val, settings, seed, device, rank, world_size, test)
    for part, split_name in ((val, "validation"), (test, "test")):
        if part is not None and isinstance(part, Dataset):
            raise engine.ConfigError(f"data: the {split_name} data is a Dataset but the training data is not")
    named = ((train, "training"), (val, "validation"), (test, "test"))
    train_xy, val_xy, test_xy = (tensors(part, name) if part is not None else None for part, name in named)
    return TensorLoaders(train_xy, val_xy, settings, seed, device, rank, world_size, test_xy)


def tensors(pair: Any, split: str = "training") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as tensors: float32 inputs; integer targets as int64 class indices, float targets as [N, k].

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
    x = x.float()
    for tensor, part in ((x, "inputs"), (y, "targets")):
        finite(tensor, f"the {split} {part}")
    return x, y


# What numpy dtype kinds hold, in words, for those that are not numbers.
NOT_NUMBERS = {"U": "str", "S": "bytes", "O": "Python object", "c": "complex", "M": "datetime", "m": "timedelta"}


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


def data_info(x: torch.Tensor, y: torch.Tensor, task: str, n_train: int, n_val: int, n_test: int) -> engine.DataInfo:
    width = x.shape[-1] if x.dim() > 1 else 1
    if task == "classification":
        return engine.DataInfo(width, class_count(int(y.min()), int(y.max()), len(y)), task, n_train, n_val, n_test)
    return engine.DataInfo(width, y.shape[-1], task, n_train, n_val, n_test)


def task_of(y: torch.Tensor, task: str) -> str:
    """What the targets are: ``data.task``, or for "auto" class indices when they are integers and
    values when they are floats."""
    if task != "auto":
        return task
    return "regression" if y.is_floating_point() else "classification"


def as_task(y: torch.Tensor, task: str, split: str) -> torch.Tensor:
    """The targets of `split` as `task` takes them: values as float [N, k], class indices as int64
    [N], binary labels as float [N, 1] of 0 and 1; a ConfigError naming data.task otherwise."""
    if task == "regression":
        return y.float().reshape(len(y), -1)
    flat = y.reshape(len(y), -1)
    if flat.shape[1] != 1:
        raise engine.ConfigError(
            f"data.task = {task!r}: the {split} targets have {flat.shape[1]} columns; labels are one column"
        )
    flat = flat[:, 0]
    if flat.is_floating_point() and not torch.equal(flat, flat.round()):
        raise engine.ConfigError(
            f"data.task = {task!r}: the {split} targets are not whole numbers "
            f'(e.g. {float(flat[flat != flat.round()][0])}); for values set data.task = "regression"'
        )
    if task == "binary":
        outside = (flat != 0) & (flat != 1)
        if outside.any():
            raise engine.ConfigError(
                f"data.task = 'binary': the {split} targets hold {float(flat[outside][0]):g}; binary labels are "
                '0 and 1 (for more classes: data.task = "classification")'
            )
        return flat.float().reshape(-1, 1)
    return flat.long()


def split_indices(
    n: int, labels: torch.Tensor | None, settings: engine.Section
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The training, validation and test samples of `n`, as indices: a permutation drawn with
    ``split_seed`` cut into ``val_fraction`` and ``test_fraction`` (at least one sample each when
    set, and one left to train on). With `labels` (classification), each held-out split takes
    every class in proportion (largest remainders), so that a rare class is not left out of it."""
    fractions = {"test_fraction": settings["test_fraction"], "val_fraction": settings["val_fraction"]}
    counts = {key: max(1, int(n * fraction)) if fraction > 0 else 0 for key, fraction in fractions.items()}
    if sum(counts.values()) >= n:
        given = [f"data.{key}: {fractions[key]}" for key in counts if counts[key]]
        samples = f"{n} sample{'s' if n > 1 else ''}"
        verb = "leaves" if len(given) == 1 else "leave"
        raise engine.ConfigError(f"{' and '.join(given)} of {samples} {verb} none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings["split_seed"]))
    held: dict[str, torch.Tensor] = {}
    if labels is None:
        start = 0
        for key, count in counts.items():
            if count:
                held[key], start = order[start : start + count], start + count
        train = order[start:]
    else:
        taken = torch.zeros(n, dtype=torch.bool)  # by position in `order`
        ordered = labels[order]
        classes, sizes = ordered.unique(return_counts=True)
        for key, count in counts.items():
            if not count:
                continue
            available = torch.stack([(~taken & (ordered == c)).sum() for c in classes])
            quota = sizes.double() * count / n
            share = torch.minimum(quota.floor().long(), available)
            while share.sum() < count:  # the rest, one each, to the classes furthest below their quota
                short = torch.where(share < available, quota - share, torch.full_like(quota, -math.inf))
                share[int(short.argmax())] += 1
            picked = torch.zeros(n, dtype=torch.bool)
            for c, k in zip(classes, share.tolist()):
                positions = (~taken & (ordered == c)).nonzero()[:k, 0]
                picked[positions] = True
            taken |= picked
            held[key] = order[picked]
        train = order[~taken]
    return train, held.get("val_fraction"), held.get("test_fraction")


def statistics(x: torch.Tensor) -> engine.Standardize:
    """Each feature's mean and standard deviation over the training inputs `x` (float64 sums); a
    feature that does not vary keeps its scale (std 1), so that it does not become inf or NaN."""
    flat = x.double().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.double().reshape(-1, 1)
    return standardize(flat.mean(dim=0), flat.std(dim=0, correction=0))


def standardize(mean: torch.Tensor, std: torch.Tensor) -> engine.Standardize:
    """The Standardize of per-feature `mean` and `std` (float64); a constant feature keeps std 1."""
    return engine.Standardize(mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float())


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


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split(count: int, parts: int, part: int) -> tuple[int, int]:
    """The bounds of piece `part` of `count` items cut into `parts` contiguous pieces (the first
    ones one item larger where `count` does not divide)."""
    base, extra = divmod(count, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


class Part:
    """This process's part of an epoch of `batches` global batches of `batch_size` out of `n`
    samples: a contiguous piece of each (`split`), at the same place in every epoch's order."""

    def __init__(self, n: int, batch_size: int, batches: int, rank: int, world_size: int) -> None:
        self.world_size = world_size
        self.sizes = [min(batch_size, n - i * batch_size) for i in range(batches)]  # the global batches
        self.bounds = [split(size, world_size, rank) for size in self.sizes]
        # This process's positions in an epoch's order, batch after batch, and where each batch's
        # piece starts among them.
        self.positions = torch.cat(
            [torch.arange(i * batch_size + low, i * batch_size + high) for i, (low, high) in enumerate(self.bounds)]
        )
        self.offsets = [0, *itertools.accumulate(high - low for low, high in self.bounds)]

    def shares(self) -> list[float]:
        return [(high - low) * self.world_size / size for (low, high), size in zip(self.bounds, self.sizes)]


def check_split(settings: engine.Section, batch_size: int, part: Part, n_val: int, n_test: int = 0) -> None:
    """ConfigErrors for data that several processes cannot share: a global batch that does not
    divide by them, a batch or validation set with fewer samples than processes."""
    world_size = part.world_size
    if settings["batch_size"] and batch_size % world_size:
        raise engine.ConfigError(
            f"data.batch_size: {batch_size} is the global batch, split over {world_size} processes: "
            f"it must divide by {world_size}"
        )
    if part.sizes[-1] < world_size:
        raise engine.ConfigError(
            f"data: the last batch of an epoch is smaller ({part.sizes[-1]}) than the number of processes "
            f"({world_size}): set data.drop_last = true or another batch_size"
        )
    for name, count in (("validation", n_val), ("test", n_test)):
        if 0 < count < world_size:
            raise engine.ConfigError(
                f"data: the {name} set is smaller ({count}) than the number of processes ({world_size})"
            )


class TensorLoaders:
    """Batches sliced from tensors that live on the device."""

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor] | None,
        settings: engine.Section,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        x, y = train
        task = task_of(y, settings["task"])
        y = as_task(y, task, "training")
        given = {"validation": val, "test": test}
        for name, pair in given.items():
            if pair is not None:
                if settings["task"] == "auto":  # the targets' kind decides the task: the same in every file
                    same_rows((x, train[1]), pair, name)
                given[name] = (pair[0], as_task(pair[1], task, name))
                same_rows((x, y), given[name], name)
        val, test = given["validation"], given["test"]
        if (val is None and settings["val_fraction"] > 0) or (test is None and settings["test_fraction"] > 0):
            wanted = {
                "val_fraction": settings["val_fraction"] if val is None else 0.0,
                "test_fraction": settings["test_fraction"] if test is None else 0.0,
            }
            stratified = settings["stratify"] and task != "regression"
            labels = y.reshape(-1).long().cpu() if stratified else None
            kept, val_order, test_order = split_indices(len(x), labels, {**settings, **wanted})
            if val_order is not None:
                val = (x[val_order], y[val_order])
            if test_order is not None:
                test = (x[test_order], y[test_order])
            x, y = x[kept], y[kept]
        self.standardize: engine.Standardize | None = statistics(x) if settings["standardize"] else None
        if self.standardize is not None:
            scale = self.standardize
            x = scale(x)
            val = (scale(val[0]), val[1]) if val is not None else None
            test = (scale(test[0]), test[1]) if test is not None else None
        every = [pair for pair in ((x, y), val, test) if pair is not None]
        self.info = data_info(
            x,
            torch.cat([pair[1] for pair in every]),  # a class may appear in a held-out split only
            task,
            len(x),
            len(val[0]) if val else 0,
            len(test[0]) if test else 0,
        )
        self.info = replace(self.info, threshold=settings["threshold"])
        self.x, self.y = x.to(device), y.to(device)
        self.val_data = (val[0].to(device), val[1].to(device)) if val else None
        self.test_data = (test[0].to(device), test[1].to(device)) if test else None
        self.batch_size = settings["batch_size"] or len(x)
        self.shuffle = settings["shuffle"] and self.batch_size < len(x)  # one whole batch: order is moot
        self.drop_last, self.seed = settings["drop_last"], seed
        if self.train_batches() == 0:
            raise engine.ConfigError(
                f"data.batch_size: {self.batch_size} with drop_last leaves no batch of {len(x)} samples"
            )
        self.part: Part | None = None
        self.val_batch_size = self.batch_size
        if world_size > 1:
            self.part = Part(len(x), self.batch_size, self.train_batches(), rank, world_size)
            check_split(settings, self.batch_size, self.part, self.info.n_val, self.info.n_test)
            self.val_batch_size = -(-self.batch_size // world_size)
            for name in ("val_data", "test_data"):
                held = getattr(self, name)
                if held is not None:
                    low, high = split(len(held[0]), world_size, rank)
                    setattr(self, name, (held[0][low:high], held[1][low:high]))
        # The batch of every epoch when one holds the set (with several processes, this one's piece).
        low, high = self.part.bounds[0] if self.part is not None else (0, len(x))
        self.whole = (engine.Batch(self.x[low:high], self.y[low:high]),)

    def train_batches(self) -> int:
        return batch_count(len(self.x), self.batch_size, self.drop_last)

    def sample(self) -> engine.Batch:
        return engine.Batch(self.x[: self.batch_size], self.y[: self.batch_size])  # the size of a batch

    def shares(self) -> list[float]:
        return self.part.shares()  # called with several processes only, where there is a part

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        if self.batch_size >= len(self.x):
            # One batch of the whole set (the tutorial): there an epoch is one step, and a generator
            # with two slices per epoch cost 8 µs of its 70 (bench/RESULTS.md).
            return iter(self.whole[start:])
        if self.part is not None:
            return self.pieces(epoch, start, self.part)
        return self.slices(epoch, start)

    def slices(self, epoch: int, start: int) -> Iterator[engine.Batch]:
        x, y = self.x, self.y
        if self.shuffle:
            # One gather of the whole set per epoch, then views: cheaper than a gather per batch.
            order = torch.randperm(len(x), generator=epoch_generator(self.seed, epoch)).to(x.device)
            x, y = x[order], y[order]
        size = self.batch_size
        for index in range(start, self.train_batches()):
            yield engine.Batch(x[index * size : (index + 1) * size], y[index * size : (index + 1) * size])

    def pieces(self, epoch: int, start: int, part: Part) -> Iterator[engine.Batch]:
        """This process's piece of each batch of the epoch's order (the order one process slices)."""
        positions = part.positions
        if self.shuffle:
            positions = torch.randperm(len(self.x), generator=epoch_generator(self.seed, epoch))[positions]
        # One gather of this process's samples per epoch, then views.
        positions = positions.to(self.x.device)
        x, y, offsets = self.x[positions], self.y[positions], part.offsets
        for index in range(start, self.train_batches()):
            yield engine.Batch(x[offsets[index] : offsets[index + 1]], y[offsets[index] : offsets[index + 1]])

    def close(self) -> None:
        pass  # nothing held but tensors

    def val(self) -> list[engine.Batch] | None:
        return self.held_out(self.val_data)

    def test(self) -> list[engine.Batch] | None:
        return self.held_out(self.test_data)

    def held_out(self, data: tuple[torch.Tensor, torch.Tensor] | None) -> list[engine.Batch] | None:
        if data is None:
            return None
        x, y = data
        size = self.val_batch_size
        return [engine.Batch(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class EpochOrder(Sampler[int]):
    """The sample order of one epoch from one position on; set before each epoch."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DatasetLoaders:
    """Batches from a ``torch.utils.data.Dataset`` through ``DataLoader``."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        settings: engine.Section,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        test: Dataset | None = None,
    ) -> None:
        if len(train) == 0:
            raise engine.ConfigError("data: the training Dataset is empty")
        wanted = {
            "val_fraction": settings["val_fraction"] if val is None else 0.0,
            "test_fraction": settings["test_fraction"] if test is None else 0.0,
        }
        if any(wanted.values()):  # not stratified: a Dataset's labels are not read ahead
            kept, val_order, test_order = split_indices(len(train), None, {**settings, **wanted})
            val = Subset(train, val_order.tolist()) if val_order is not None else val
            test = Subset(train, test_order.tolist()) if test_order is not None else test
            train = Subset(train, kept.tolist())
        self.n, self.seed, self.shuffle = len(train), seed, settings["shuffle"]
        self.batch_size = settings["batch_size"] or self.n
        self.drop_last = settings["drop_last"]
        if self.train_batches() == 0:
            raise engine.ConfigError(
                f"data.batch_size: {self.batch_size} with drop_last leaves no batch of {self.n} samples"
            )
        # The sampler takes this process's samples of the epoch's order: all of it in a single process.
        self.part = Part(self.n, self.batch_size, self.train_batches(), rank, world_size)
        n_val, n_test = (len(held) if held is not None else 0 for held in (val, test))
        splits = {"training": train, "validation": val, "test": test}  # whole, before each process takes its piece
        if world_size > 1:
            check_split(settings, self.batch_size, self.part, n_val, n_test)
            if val is not None:
                val = Subset(val, range(*split(n_val, world_size, rank)))
            if test is not None:
                test = Subset(test, range(*split(n_test, world_size, rank)))
        self.order = EpochOrder()
        options = {
            "batch_size": -(-self.batch_size // world_size),
            "num_workers": settings["num_workers"],
            "pin_memory": settings["pin_memory"] and device.type == "cuda",
            "persistent_workers": settings["num_workers"] > 0,
        }
        # Each DataLoader draws its workers' base seed at `iter()`: from a generator of its own,
        # not the global torch RNG, so that a run resumed at another epoch draws the same dropout.
        # The sampler holds the samples of whole batches only (drop_last applies to the global ones).
        self.loader = DataLoader(train, sampler=self.order, generator=epoch_generator(seed, -1), **options)
        self.val_loader, self.test_loader = (
            DataLoader(held, shuffle=False, generator=epoch_generator(seed, -2), **options)
            if held is not None
            else None
            for held in (val, test)
        )
        self.device, self.dataset = device, train
        x, y = sample_tensors(train, 0)
        self.task = task_of(y, settings["task"])
        # Cast like in-memory data: float inputs to float32 (numpy's float64 would meet float32
        # weights), targets as the task takes them; integer inputs (token ids) stay as they are.
        self.x_dtype = torch.float32 if x.is_floating_point() else None
        self.y_dtype = torch.int64 if self.task == "classification" else torch.float32
        self.info = replace(self._data_info(splits, x, y, n_val, n_test), threshold=settings["threshold"])
        self.standardize: engine.Standardize | None = None
        self.scale: engine.Standardize | None = None  # the same, on the device
        if settings["standardize"]:
            if self.x_dtype is None:
                raise engine.ConfigError(
                    "data.standardize: the Dataset's inputs are integers (token ids?), not features"
                )
            self.standardize = self.statistics(train, settings["num_workers"])
            self.scale = engine.Standardize(self.standardize.mean, self.standardize.std).to(device)

    def _data_info(
        self, splits: Mapping[str, Dataset | None], x: torch.Tensor, y: torch.Tensor, n_val: int, n_test: int
    ) -> engine.DataInfo:
        """What the data is. Class labels are read once from every split (a class may appear in
        the held-out ones only) and checked as `data.task` takes them, unless the Dataset (or the
        one a split was cut from) names its ``classes``."""
        n_features = x.shape[-1] if x.dim() else 1
        if self.task == "regression":
            return engine.DataInfo(n_features, y.shape[-1] if y.dim() else 1, "regression", self.n, n_val, n_test)
        classes = named_classes(splits["training"])
        if classes is not None and self.task == "classification":
            return engine.DataInfo(n_features, len(classes), "classification", self.n, n_val, n_test)
        labels = []
        for name, dataset in splits.items():
            if dataset is not None:
                read = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
                labels.append(as_task(read, self.task, name))
        if self.task == "binary":
            return engine.DataInfo(n_features, 1, "binary", self.n, n_val, n_test)
        every = torch.cat(labels)
        count = class_count(int(every.min()), int(every.max()), len(every))
        return engine.DataInfo(n_features, count, "classification", self.n, n_val, n_test)

    def statistics(self, train: Dataset, workers: int) -> engine.Standardize:
        """The training inputs' mean and standard deviation per feature, in one pass over them."""
        total = squares = None
        count = 0
        for x, _ in DataLoader(train, batch_size=1024, num_workers=workers):
            flat = x.double().reshape(-1, x.shape[-1]) if x.dim() > 1 else x.double().reshape(-1, 1)
            total = flat.sum(0) if total is None else total + flat.sum(0)
            squares = (flat * flat).sum(0) if squares is None else squares + (flat * flat).sum(0)
            count += len(flat)
        assert total is not None and squares is not None
        mean = total / count
        return standardize(mean, (squares / count - mean * mean).clamp_min(0).sqrt())

    def sample(self) -> engine.Batch:
        # Read here, not through the DataLoader: its workers and their seeds belong to the epochs.
        # A few samples show the shapes; each may cost a file read and a decode.
        count = min(self.n, self.batch_size, SAMPLE_SIZE)
        x, y = default_collate([self.dataset[i] for i in range(count)])
        return self.on_device(x, y)

    def train_batches(self) -> int:
        return batch_count(self.n, self.batch_size, self.drop_last)

    def shares(self) -> list[float]:
        return self.part.shares()

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        positions = self.part.positions[self.part.offsets[start] :]
        order = (
            torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))[positions]
            if self.shuffle
            else positions
        )
        self.order.indices = order.tolist()
        for x, y in self.loader:
            yield self.on_device(x, y)

    def val(self) -> Iterator[engine.Batch] | None:
        if self.val_loader is None:
            return None
        return (self.on_device(x, y) for x, y in self.val_loader)

    def test(self) -> Iterator[engine.Batch] | None:
        if self.test_loader is None:
            return None
        return (self.on_device(x, y) for x, y in self.test_loader)

    def close(self) -> None:
        """Stop the persistent worker processes now, not when the loaders are garbage collected
        (a Trainer's bound hooks form a reference cycle: that can be at interpreter exit, which
        then waits for them). torch has no public call for it; the iterator's own is used."""
        for loader in (self.loader, self.val_loader, self.test_loader):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None

    def on_device(self, x: torch.Tensor, y: torch.Tensor) -> engine.Batch:
        """A collated batch on the run's device (non-blocking from pinned memory), as a Batch."""
        x = x.to(self.device, self.x_dtype, non_blocking=True)
        y = y.to(self.device, self.y_dtype, non_blocking=True)
        if self.task != "classification" and y.dim() == 1:  # values and binary labels: [N, 1]
            y = y.reshape(-1, 1)
        return engine.Batch(self.scale(x) if self.scale is not None else x, y)


def named_classes(dataset: Dataset) -> Any:
    """The ``classes`` a Dataset names (torchvision's do), looked up through the Subsets a split makes."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "classes"):
        dataset = dataset.dataset
    return getattr(dataset, "classes", None)


def sample_tensors(dataset: Dataset, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `index` of a Dataset as two tensors of numbers, or a ConfigError saying what it is."""
    sample = dataset[index]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise engine.ConfigError(
            f"data: sample {index} of the Dataset is a {type(sample).__name__}, not an (input, target) pair"
        )
    pair = []
    for value, part in zip(sample, ("input", "target")):
        if not isinstance(value, (torch.Tensor, np.ndarray, np.generic, int, float)):
            kind = type(value)
            raise engine.ConfigError(
                f"data: the {part} of sample {index} of the Dataset is a {kind.__module__}.{kind.__qualname__}, "
                "not a tensor, array or number (convert it in the Dataset)"
            )
        pair.append(numbers(value, f"the {part} of sample {index} of the Dataset"))
    return pair[0], pair[1]
