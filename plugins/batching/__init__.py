"""Turns what the data component returned into train, validation and test batches
(`build_loaders`).

In-memory tensors are moved to the device once and batched by slicing one seeded permutation per
epoch: no per-sample Python work, unlike a DataLoader. A ``torch.utils.data.Dataset`` goes through
``DataLoader``. Either way the order of epoch `e` depends only on (seed, e), so a resumed run can
start at any batch.

Before batching, one pipeline for both (`prepare`): the target's task (``data.task``: class
indices, values, or 0/1 labels for ``binary``; a trained run's recorded task when another of its
files is read), the validation and test splits (``val_fraction``, ``test_fraction``), drawn with
``split_seed`` (not ``seed``: changing the seed of the training does not move the split) and, for
in-memory classification, stratified by class, and ``standardize``: each input feature's mean
and standard deviation (``"channels"``: each image channel's, over its pixels) over the training
split alone, which the model applies first (the loaders' `engine.InputTransform` ``standardize``
or ``standardize_channels``, saved with the model).

With several processes, ``data.batch_size`` is the global batch (it must divide by the number of
processes), and each process takes its own contiguous piece of every batch of the same epoch
order (`Part`), so that together they see the batches one process would; an epoch's last batch
may split unevenly (`Loaders.shares`). The held-out data is cut into one piece per process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Subset

import engine

from .data import (
    as_task,
    named_classes,
    outputs_of,
    pair_of,
    same_rows,
    sample_tensors,
    task_of,
    tensors,
    zeros_and_ones,
)
from .loaders import DatasetLoaders, TensorLoaders, quiet_worker, started
from .splits import Part, batch_count, check_split, split_indices

SPLITS = ("training", "validation", "test")


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
    # Inputs scaled by the training split's mean and standard deviation: of each feature (true,
    # "features": the last dimension) or of each channel of images ("channels": C of C x H x W).
    standardize: bool | Literal["features", "channels"] = False
    # auto: integer targets are class indices (several per sample: a sequence), others values;
    # binary: 0/1 labels (bce_with_logits); sequence: a class index per position ([N, T])
    task: Literal["auto", "regression", "classification", "binary", "sequence"] = "auto"
    # binary: a probability of class 1 above it predicts 1 (accuracy, the metrics, predict)
    threshold: Annotated[float, engine.Range(gt=0, lt=1)] = 0.5
    num_workers: Annotated[int, engine.Range(ge=0)] = 0
    pin_memory: Annotated[bool, engine.Changeable()] = False  # speed only: a resumed run may change it
    # A Dataset whose samples are dicts: the key of the targets; the other items are the inputs,
    # which the model takes as keyword arguments (engine/calling.py).
    target_key: str = "labels"


class Standardize(torch.nn.Module):
    """``(x - mean) / std`` per input feature (the last dimension)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def standardization(info: engine.DataInfo) -> Standardize:
    """A standardization of `info.n_features` features, for a run's saved statistics to load into."""
    return Standardize(torch.zeros(info.n_features), torch.ones(info.n_features))


def channel_standardization(info: engine.DataInfo) -> Standardize:
    """A standardization of each channel of `info.input_shape` (C x H x W: C means, shaped (C, 1, 1))."""
    shape = channel_shape(info.input_shape)
    return Standardize(torch.zeros(shape), torch.ones(shape))


def channel_shape(sample: tuple[int, ...]) -> tuple[int, ...]:
    """How a statistic per channel broadcasts over samples of shape `sample` (channel first)."""
    return (sample[0], *(1,) * (len(sample) - 1))


def fitted(
    mean: torch.Tensor, std: torch.Tensor, by: bool | str = "features", sample: tuple[int, ...] = ()
) -> engine.InputTransform:
    """The standardization by `mean` and `std` (float64) per feature, or per channel (`by`) of
    samples of shape `sample`; a constant feature keeps its scale (std 1), so that it does not
    become inf or NaN."""
    std = torch.where(std > 0, std, torch.ones_like(std))
    if by == "channels":
        shape = channel_shape(sample)
        module = Standardize(mean.float().reshape(shape), std.float().reshape(shape))
        return engine.InputTransform("standardize_channels", module)
    return engine.InputTransform("standardize", Standardize(mean.float(), std.float()))


def statistics_rows(x: torch.Tensor, by: bool | str) -> torch.Tensor:
    """A batch of inputs as rows of the values each statistic is taken over: one column per
    feature (the last dimension), or per channel (the first of a sample's dimensions, `by`)."""
    if by == "channels":
        if x.dim() < 3:
            raise engine.ConfigError(
                f"data.standardize = 'channels': the samples have shape {tuple(x.shape[1:])}, not channels of "
                "images (C, H, W)"
            )
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)


@engine.hookimpl
def register_settings():
    return {"data": Batching}


@engine.hookimpl
def register_components():
    return {"input_transform": {"standardize": standardization, "standardize_channels": channel_standardization}}


@engine.hookimpl(trylast=True)
def build_loaders(
    data: Any, config: engine.Config, seed: int, device: torch.device, rank: int, world_size: int
) -> engine.Loaders:
    settings = config["data"]
    # The loss's name (a core kind's, which every plugin may read): bce_with_logits takes 0/1 labels.
    prepared = prepare(splits_of(data), settings, config["inferred"]["task"], config["loss"]["name"] or "")
    n = prepared.info.n_train
    batch_size = settings["batch_size"] or n
    batches = batch_count(n, batch_size, settings["drop_last"])
    if batches == 0:
        raise engine.ConfigError(f"data.batch_size: {batch_size} with drop_last leaves no batch of {n} samples")
    part = Part(n, batch_size, batches, rank, world_size)
    if world_size > 1:
        check_split(settings, batch_size, part, prepared.info.n_val, prepared.info.n_test)
    kind = DatasetLoaders if isinstance(prepared.train, Dataset) else TensorLoaders
    return kind(prepared, settings, seed, device, part)


def splits_of(data: Any) -> dict[str, Any]:
    """What the data component returned, by split (None where it gave none)."""
    parts = (data["train"], data.get("val"), data.get("test")) if isinstance(data, Mapping) else (data, None, None)
    splits = dict(zip(SPLITS, parts))
    is_dataset = isinstance(splits["training"], Dataset)
    for name in SPLITS[1:]:
        if splits[name] is not None and isinstance(splits[name], Dataset) != is_dataset:
            raise engine.ConfigError(
                f"data: the {name} data is {'not ' if is_dataset else ''}a Dataset but the training data is"
                + ("" if is_dataset else " not")
            )
    return splits


@dataclass(slots=True)
class Prepared:
    """The data as the loaders take it: the splits (pairs of tensors, or Datasets), what they are,
    and the input transform fitted on the training split."""

    train: Any
    val: Any
    test: Any
    task: str
    info: engine.DataInfo
    transform: engine.InputTransform | None
    # A Dataset's float inputs are cast to float32 (numpy's float64 would meet float32 weights);
    # integer inputs (token ids) stay as they are.


def prepare(splits: dict[str, Any], settings: Any, recorded_task: str, loss: str = "") -> Prepared:
    """The pipeline before batching: checked data, its task (which `loss` may tell), the held-out
    splits, the input transform and what the data is (`engine.DataInfo`)."""
    if isinstance(splits["training"], Dataset):
        return prepare_dataset(splits, settings, recorded_task, loss)
    return prepare_tensors(splits, settings, recorded_task, loss)


def described(x: torch.Tensor, n_outputs: int, task: str, parts: list[Any], settings: Any) -> engine.DataInfo:
    """The DataInfo of data whose training inputs look like `x`, split into `parts`."""
    train, val, test = (0 if part is None else len(part[0]) if isinstance(part, tuple) else len(part) for part in parts)
    width = x.shape[-1] if x.dim() > 1 else 1
    shape = tuple(x.shape[1:])
    return engine.DataInfo(width, n_outputs, task, train, val, test, settings["threshold"], shape)


def prepare_tensors(splits: dict[str, Any], settings: Any, recorded_task: str, loss: str) -> Prepared:
    """In-memory data: every split checked and its targets as the task takes them, then the
    held-out splits drawn (stratified for labels) and the standardization fitted."""
    pairs = {name: tensors(part, name) for name, part in splits.items() if part is not None}
    x, raw_y = pairs["training"]
    labels = all(zeros_and_ones(targets) for _, targets in pairs.values())  # 0/1 in every split
    task = task_of(raw_y, settings["task"], recorded_task, loss if labels else "")
    pairs["training"] = (x, as_task(raw_y, task, "training"))
    for name in SPLITS[1:]:
        if name in pairs:
            inputs, targets = pairs[name]
            if settings["task"] == "auto":  # the targets' kind decides the task: the same in every file
                same_rows((x, raw_y), (inputs, targets), name)
            pairs[name] = (inputs, as_task(targets, task, name))
            same_rows(pairs["training"], pairs[name], name)
    stratified = settings["stratify"] and task in ("classification", "binary")
    labels = pairs["training"][1].reshape(-1).long().cpu() if stratified else None
    held = held_out(len(x), labels, settings, "validation" in pairs, "test" in pairs)
    x, y = pairs["training"]
    pairs.update({name: (x[order], y[order]) for name, order in held.items()})
    x = pairs["training"][0]
    every = torch.cat([targets for _, targets in pairs.values()])  # a class may appear in a held-out split only
    parts = [pairs.get(name) for name in SPLITS]
    by, transform = settings["standardize"], None
    if by and not x.is_floating_point():
        raise engine.ConfigError("data.standardize: the inputs are integers (token ids?), not features")
    if by:
        flat = statistics_rows(x.double(), by)
        transform = fitted(flat.mean(dim=0), flat.std(dim=0, correction=0), by, tuple(x.shape[1:]))
    info = described(x, outputs_of(every, task), task, parts, settings)
    return Prepared(*parts, task, info, transform)


def held_out(n: int, labels: torch.Tensor | None, settings: Any, has_val: bool, has_test: bool) -> dict[str, Any]:
    """The indices of the splits drawn from the training data (``val_fraction`` and
    ``test_fraction``, where the data component gave no such split), with those it keeps."""
    wanted = {
        "val_fraction": 0.0 if has_val else settings["val_fraction"],
        "test_fraction": 0.0 if has_test else settings["test_fraction"],
    }
    if not any(wanted.values()):
        return {}
    kept, val, test = split_indices(n, labels, {**settings, **wanted})
    found = {"training": kept, "validation": val, "test": test}
    return {name: order for name, order in found.items() if order is not None}


def prepare_dataset(splits: dict[str, Any], settings: Any, recorded_task: str, loss: str) -> Prepared:
    """A Dataset: the held-out splits cut as Subsets (not stratified: its labels are not read
    ahead), its task from its first sample (and, for 0/1 labels a loss takes, from all of them),
    and the standardization fitted in one pass."""
    train = splits["training"]
    if len(train) == 0:
        raise engine.ConfigError("data: the training Dataset is empty")
    held = held_out(len(train), None, settings, splits["validation"] is not None, splits["test"] is not None)
    parts = {name: Subset(train, order.tolist()) for name, order in held.items()}
    splits = {**splits, **parts}
    target_key = settings["target_key"]
    x, y = sample_tensors(splits["training"], 0, target_key)
    task = task_of(y[None], settings["task"], recorded_task, loss)
    if (
        task == "binary"
        and settings["task"] == "auto"
        and not recorded_task
        and not zeros_and_ones(all_targets(splits, target_key))
    ):
        task = task_of(y[None], "auto", "")  # the first sample's 0 or 1 said binary; the others do not
    n_outputs = dataset_outputs(splits, y, task, target_key)
    first = next(iter(x.values())) if isinstance(x, Mapping) else x  # the width of the first input
    transform = None
    if settings["standardize"]:
        if isinstance(x, Mapping) or not first.is_floating_point():
            raise engine.ConfigError("data.standardize: the Dataset's inputs are not features (token ids, a dict?)")
        transform = dataset_statistics(splits["training"], settings["num_workers"], settings["standardize"])
    parts = [splits[name] for name in SPLITS]
    info = described(first[None] if first.dim() else first.reshape(1, 1), n_outputs, task, parts, settings)
    return Prepared(*parts, task, info, transform)


def all_targets(splits: dict[str, Any], target_key: str) -> torch.Tensor:
    """Every target of every split of a Dataset, one row a sample."""
    found = [
        torch.as_tensor(pair_of(dataset[i], target_key, i)[1]).double().reshape(1, -1)
        for dataset in splits.values()
        if dataset is not None
        for i in range(len(dataset))
    ]
    return torch.cat(found)


def dataset_outputs(splits: dict[str, Any], y: torch.Tensor, task: str, target_key: str) -> int:
    """The model's outputs for a Dataset's targets: their width for values; for labels, read once
    from every split (a class may appear in the held-out ones only) and checked as `data.task`
    takes them, unless the Dataset (or the one a split was cut from) names its ``classes``."""
    if task == "regression":
        return y.shape[-1] if y.dim() else 1
    classes = named_classes(splits["training"])
    if classes is not None and task in ("classification", "sequence"):
        return len(classes)
    labels = [
        as_task(
            torch.stack([torch.as_tensor(pair_of(dataset[i], target_key, i)[1]) for i in range(len(dataset))]),
            task,
            name,
        )
        for name, dataset in splits.items()
        if dataset is not None
    ]
    return outputs_of(torch.cat(labels), task)


def dataset_statistics(train: Dataset, workers: int, by: bool | str = "features") -> engine.InputTransform:
    """The training inputs' mean and standard deviation per feature (or channel, `by`), in one pass over them."""
    total = squares = None
    count, sample = 0, ()
    loader = DataLoader(train, batch_size=1024, num_workers=workers, worker_init_fn=quiet_worker if workers else None)
    for x, _ in started(loader):
        flat, sample = statistics_rows(x.double(), by), tuple(x.shape[1:])
        total = flat.sum(0) if total is None else total + flat.sum(0)
        squares = (flat * flat).sum(0) if squares is None else squares + (flat * flat).sum(0)
        count += len(flat)
    assert total is not None and squares is not None
    mean = total / count
    return fitted(mean, (squares / count - mean * mean).clamp_min(0).sqrt(), by, sample)
