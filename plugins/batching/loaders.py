"""The two kinds of loaders: batches sliced from tensors that live on the device, and batches of a
``torch.utils.data.Dataset`` through ``DataLoader``. Both take the data as `prepare` left it and
this process's `Part` of every batch.

DataLoader's worker processes ignore SIGINT and SIGTERM (`quiet_worker`). Schedulers (Slurm,
systemd, Kubernetes) and a terminal's Ctrl-C signal the whole process group: a worker that died
of it would fail the run ("DataLoader worker ... is killed by signal") before the run could stop
as it should, at the end of its window with a checkpoint. The run stops its workers itself when
it ends (`close`). They are started with the two signals blocked (`started`), so that none
arrives between a worker's fork and its handlers.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset, default_collate

import engine

from .splits import Part, epoch_generator, split

# How many samples of a Dataset `DatasetLoaders.sample` reads for the setup chain's check.
SAMPLE_SIZE = 8


class TensorLoaders:
    """Batches sliced from tensors that live on the device: one gather of this process's samples
    per epoch, in the epoch's seeded order, then views."""

    def __init__(self, prepared: Any, settings: Any, seed: int, device: torch.device, part: Part) -> None:
        self.info, self.input_transform, self.part = prepared.info, prepared.transform, part
        x, y = prepared.train
        self.x, self.y = x.to(device), y.to(device)
        self.val_data, self.test_data = (self.piece(held, device) for held in (prepared.val, prepared.test))
        self.batch_size = part.batch_size
        self.shuffle = settings["shuffle"] and self.batch_size < len(x)  # one whole batch: order is moot
        self.seed = seed
        # The batch of every epoch when one holds the set (with several processes, this one's piece).
        low, high = part.bounds[0]
        self.whole = (engine.Batch(self.x[low:high], self.y[low:high]),)

    def piece(self, held: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This process's piece of a held-out split, on the device."""
        if held is None:
            return None
        low, high = split(len(held[0]), self.part.world_size, self.part.rank)
        return held[0][low:high].to(device), held[1][low:high].to(device)

    def train_batches(self) -> int:
        return len(self.part.sizes)

    def sample(self) -> engine.Batch:
        return engine.Batch(self.x[: self.batch_size], self.y[: self.batch_size])  # the size of a batch

    def shares(self) -> list[float]:
        return self.part.shares()

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        if len(self.part.sizes) == 1:
            # One batch of the whole set (the tutorial): there an epoch is one step, and a generator
            # with a gather per epoch cost 8 us of its 70 (bench loop-overhead:tutorial:cpu).
            return iter(self.whole[start:])
        return self.pieces(epoch, start)

    def pieces(self, epoch: int, start: int) -> Iterator[engine.Batch]:
        """This process's piece of each batch of the epoch's order."""
        positions = self.part.positions
        if self.shuffle:
            positions = torch.randperm(len(self.x), generator=epoch_generator(self.seed, epoch))[positions]
        positions = positions.to(self.x.device)
        x, y, offsets = self.x[positions], self.y[positions], self.part.offsets
        for index in range(start, len(self.part.sizes)):
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
        size = self.part.piece_size
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
    """Batches from a ``torch.utils.data.Dataset`` through ``DataLoader``, each taken to the
    device with its targets as the task takes them."""

    def __init__(self, prepared: Any, settings: Any, seed: int, device: torch.device, part: Part) -> None:
        self.info, self.input_transform, self.part = prepared.info, prepared.transform, part
        self.dataset, self.task = prepared.train, prepared.task
        self.seed, self.shuffle, self.device = seed, settings["shuffle"], device
        self.y_dtype = torch.int64 if self.task in ("classification", "sequence") else torch.float32
        workers = settings["num_workers"]
        self.collate = functools.partial(collate, target_key=settings["target_key"])
        options = {
            "collate_fn": self.collate,
            "batch_size": part.piece_size,
            "num_workers": workers,
            "pin_memory": settings["pin_memory"] and device.type == "cuda",
            "persistent_workers": workers > 0,
            "worker_init_fn": quiet_worker if workers else None,
        }
        # Each DataLoader draws its workers' base seed at `iter()`: from a generator of its own,
        # not the global torch RNG, so that a run resumed at another epoch draws the same dropout.
        # The sampler holds the samples of whole batches only (drop_last applies to the global ones).
        self.order = EpochOrder()
        self.loader = DataLoader(self.dataset, sampler=self.order, generator=epoch_generator(seed, -1), **options)
        self.val_loader, self.test_loader = (
            self.held_out(held, options, seed) for held in (prepared.val, prepared.test)
        )

    def held_out(self, held: Any, options: dict[str, Any], seed: int) -> DataLoader | None:
        """A loader of this process's piece of a held-out split, in order."""
        if held is None:
            return None
        piece = Subset(held, range(*split(len(held), self.part.world_size, self.part.rank)))
        return DataLoader(piece, shuffle=False, generator=epoch_generator(seed, -2), **options)

    def sample(self) -> engine.Batch:
        # Read here, not through the DataLoader: its workers and their seeds belong to the epochs.
        # A few samples show the shapes; each may cost a file read and a decode.
        count = min(len(self.dataset), self.part.batch_size, SAMPLE_SIZE)
        x, y = self.collate([self.dataset[i] for i in range(count)])
        return self.on_device(x, y)

    def train_batches(self) -> int:
        return len(self.part.sizes)

    def shares(self) -> list[float]:
        return self.part.shares()

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        positions = self.part.positions[self.part.offsets[start] :]
        if self.shuffle:
            positions = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))[positions]
        self.order.indices = positions.tolist()
        for x, y in started(self.loader):
            yield self.on_device(x, y)

    def val(self) -> Iterator[engine.Batch] | None:
        return self.batches(self.val_loader)

    def test(self) -> Iterator[engine.Batch] | None:
        return self.batches(self.test_loader)

    def batches(self, loader: DataLoader | None) -> Iterator[engine.Batch] | None:
        return None if loader is None else (self.on_device(x, y) for x, y in started(loader))

    def close(self) -> None:
        """Stop the persistent worker processes now, not when the loaders are garbage collected
        (a Trainer's bound hooks form a reference cycle: that can be at interpreter exit, which
        then waits for them). torch has no public call for it; the iterator's own is used."""
        for loader in (self.loader, self.val_loader, self.test_loader):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None

    def on_device(self, x: Any, y: torch.Tensor) -> engine.Batch:
        """A collated batch on the run's device (non-blocking from pinned memory), as a Batch: float
        inputs as float32 (numpy's float64 would meet float32 weights), integer ones (token ids)
        as they are; a dict of inputs, each so."""
        x = {key: self.input(value) for key, value in x.items()} if isinstance(x, Mapping) else self.input(x)
        y = y.to(self.device, self.y_dtype, non_blocking=True)
        if self.task in ("regression", "binary") and y.dim() == 1:  # values and binary labels: [N, 1]
            y = y.reshape(-1, 1)
        return engine.Batch(x, y)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, torch.float32 if x.is_floating_point() else None, non_blocking=True)


def collate(samples: list[Any], target_key: str) -> tuple[Any, Any]:
    """A batch of a Dataset's samples as (inputs, targets): of (input, target) pairs, or of dicts
    whose `target_key` item is the target (the inputs: a dict of the other items, batched)."""
    if isinstance(samples[0], Mapping):
        inputs = [{key: value for key, value in sample.items() if key != target_key} for sample in samples]
        return default_collate(inputs), default_collate([sample[target_key] for sample in samples])
    return default_collate(samples)


SIGNALS = {signal.SIGINT, signal.SIGTERM}


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker's start: the run, not its workers, answers SIGINT and SIGTERM (see the
    module docstring). A signal that arrived while they were blocked is dropped with them."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def started(loader: Iterable[Any]) -> Iterator[Any]:
    """``iter(loader)`` (which starts a DataLoader's workers the first time) with SIGINT and SIGTERM
    held back: a worker forked meanwhile starts with them blocked until `quiet_worker` ignores
    them, and this process receives what arrived once they are unblocked here."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
