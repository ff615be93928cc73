"""Turns what the data component returned into train and validation batches (`build_loaders`).

In-memory tensors are moved to the device once and batched by slicing one seeded permutation per
epoch: no per-sample Python work, unlike a DataLoader. A ``torch.utils.data.Dataset`` goes through
``DataLoader``. Either way the order of epoch `e` depends only on (seed, e), so a resumed run can
start at any batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import engine


@dataclass(frozen=True)
class Batching:
    """The ``[data]`` settings of batching, beside the dataset's own."""

    batch_size: Annotated[int, engine.Range(ge=0)] = 0  # 0: the whole training set in one batch (the tutorial)
    shuffle: bool = True
    drop_last: bool = False
    val_fraction: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0
    num_workers: Annotated[int, engine.Range(ge=0)] = 0
    pin_memory: bool = False


@engine.hookimpl
def register_settings():
    return {"data": Batching}


@engine.hookimpl(trylast=True)
def build_loaders(data: Any, config: engine.Config, seed: int, device: torch.device) -> engine.Loaders:
    settings = config["data"]
    train, val = (data["train"], data.get("val")) if isinstance(data, Mapping) else (data, None)
    if isinstance(train, Dataset):
        return DatasetLoaders(train, val, settings, seed, device)
    return TensorLoaders(tensors(train), tensors(val) if val is not None else None, settings, seed, device)


def tensors(pair: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as tensors: float32 inputs; integer targets as int64 class indices, float targets as [N, k]."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise engine.ConfigError(
            f"data: the data component must return (x, y), a Dataset or {{'train', 'val'}}, got {type(pair).__name__}"
        )
    x, y = (torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a) for a in pair)
    if len(x) != len(y):
        raise engine.ConfigError(f"data: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise engine.ConfigError("data: the dataset is empty")
    if y.is_floating_point():
        y = y.float().reshape(len(y), -1) if y.dim() == 1 else y.float()
    else:
        y = y.long()
    return x.float(), y


def data_info(x: torch.Tensor, y: torch.Tensor, n_train: int, n_val: int) -> engine.DataInfo:
    if y.is_floating_point():
        return engine.DataInfo(x.shape[-1] if x.dim() > 1 else 1, y.shape[-1], "regression", n_train, n_val)
    low = int(y.min())
    if low < 0 and low != -100:
        raise engine.ConfigError(f"data: class indices must be 0 or more, found {low}")
    return engine.DataInfo(x.shape[-1] if x.dim() > 1 else 1, int(y.max()) + 1, "classification", n_train, n_val)


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class TensorLoaders:
    """Batches sliced from tensors that live on the device."""

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor] | None,
        settings: engine.Section,
        seed: int,
        device: torch.device,
    ) -> None:
        x, y = train
        if val is None and settings["val_fraction"] > 0:
            order = torch.randperm(len(x), generator=epoch_generator(seed, 0))
            n_val = max(1, int(len(x) * settings["val_fraction"]))
            val, (x, y) = (x[order[:n_val]], y[order[:n_val]]), (x[order[n_val:]], y[order[n_val:]])
        self.info = data_info(
            torch.cat([x, val[0]]) if val else x,
            torch.cat([y, val[1]]) if val else y,
            len(x),
            len(val[0]) if val else 0,
        )
        self.x, self.y = x.to(device), y.to(device)
        self.val_data = (val[0].to(device), val[1].to(device)) if val else None
        self.batch_size = settings["batch_size"] or len(x)
        self.shuffle = settings["shuffle"] and self.batch_size < len(x)  # one whole batch: order is moot
        self.drop_last, self.seed = settings["drop_last"], seed
        self.whole = (engine.Batch(self.x, self.y),)  # the batch of every epoch when one holds the set
        if self.train_batches() == 0:
            raise engine.ConfigError(
                f"data.batch_size: {self.batch_size} with drop_last leaves no batch of {len(x)} samples"
            )

    def train_batches(self) -> int:
        return batch_count(len(self.x), self.batch_size, self.drop_last)

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        if self.batch_size >= len(self.x):
            # One batch of the whole set (the tutorial): there an epoch is one step, and a generator
            # with two slices per epoch cost 8 µs of its 70 (bench/RESULTS.md).
            return iter(self.whole[start:])
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

    def close(self) -> None:
        pass  # nothing held but tensors

    def val(self) -> list[engine.Batch] | None:
        if self.val_data is None:
            return None
        x, y = self.val_data
        size = self.batch_size
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
        self, train: Dataset, val: Dataset | None, settings: engine.Section, seed: int, device: torch.device
    ) -> None:
        if val is None and settings["val_fraction"] > 0:
            n_val = max(1, int(len(train) * settings["val_fraction"]))
            val, train = torch.utils.data.random_split(
                train, [n_val, len(train) - n_val], generator=epoch_generator(seed, 0)
            )
        self.n, self.seed, self.shuffle = len(train), seed, settings["shuffle"]
        self.batch_size = settings["batch_size"] or self.n
        self.drop_last = settings["drop_last"]
        self.order = EpochOrder()
        options = {
            "batch_size": self.batch_size,
            "num_workers": settings["num_workers"],
            "pin_memory": settings["pin_memory"] and device.type == "cuda",
            "persistent_workers": settings["num_workers"] > 0,
        }
        # Each DataLoader draws its workers' base seed at `iter()`: from a generator of its own,
        # not the global torch RNG, so that a run resumed at another epoch draws the same dropout.
        self.loader = DataLoader(
            train, sampler=self.order, drop_last=self.drop_last, generator=epoch_generator(seed, -1), **options
        )
        self.val_loader = (
            DataLoader(val, shuffle=False, generator=epoch_generator(seed, -2), **options) if val is not None else None
        )
        self.device = device
        self.info = self._data_info(train, len(val) if val is not None else 0)

    def _data_info(self, dataset: Dataset, n_val: int) -> engine.DataInfo:
        x, y = dataset[0]
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        n_features = x.shape[-1] if x.dim() else 1
        if y.is_floating_point():
            return engine.DataInfo(n_features, y.shape[-1] if y.dim() else 1, "regression", self.n, n_val)
        classes = getattr(dataset, "classes", None)
        n_classes = len(classes) if classes is not None else 1 + max(int(dataset[i][1]) for i in range(self.n))
        return engine.DataInfo(n_features, n_classes, "classification", self.n, n_val)

    def train_batches(self) -> int:
        return batch_count(self.n, self.batch_size, self.drop_last)

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        order = (
            torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
            if self.shuffle
            else torch.arange(self.n)
        )
        self.order.indices = order[start * self.batch_size :].tolist()
        for x, y in self.loader:
            yield self.on_device(x, y)

    def val(self) -> Iterator[engine.Batch] | None:
        if self.val_loader is None:
            return None
        return (self.on_device(x, y) for x, y in self.val_loader)

    def close(self) -> None:
        """Stop the persistent worker processes now, not when the loaders are garbage collected
        (a Trainer's bound hooks form a reference cycle: that can be at interpreter exit, which
        then waits for them). torch has no public call for it; the iterator's own is used."""
        for loader in (self.loader, self.val_loader):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None

    def on_device(self, x: torch.Tensor, y: torch.Tensor) -> engine.Batch:
        """A collated batch on the run's device (non-blocking from pinned memory), as a Batch."""
        return engine.Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
