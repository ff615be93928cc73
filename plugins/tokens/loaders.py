"""Batches of windows of a token stream: a window is `block_size` tokens as the input and the same
tokens shifted by one as the targets (a language model's next token at every position).

Training windows are drawn at random positions of the training stream, a fresh draw for every
batch from a generator seeded by (seed, the batch's number), for ever (``windows = "random"``:
nanoGPT's ``get_batch``), or cut from the stream without overlap and gone through once an epoch,
in a seeded order (``data.shuffle``) or in order (``windows = "sequential"``). Either way a batch
depends only on the seed and its place, so a resumed run continues with the batches it would have
had, and with several processes each takes its contiguous piece of every (global) batch, so that
they see together the windows one process would. Validation and test windows are every window of
their stream, without overlap, or a fixed seeded set of ``val_windows`` of them; each process
takes a contiguous piece.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

import engine

from .files import TokenFile

SAMPLE_WINDOWS = 8  # windows in the sample the setup chain checks the model on


class Stream:
    """Tokens `start` to `stop` of a token file: a split of it (the tail of a stream is its validation)."""

    def __init__(self, tokens: TokenFile, start: int, stop: int) -> None:
        self.tokens, self.start, self.stop = tokens, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def windows(self, positions: np.ndarray, length: int) -> np.ndarray:
        """The `length` + 1 tokens from each of `positions`, as int64 [len(positions), length + 1],
        the pages read given back (`TokenFile.release`)."""
        starts = positions + self.start
        gathered = self.tokens.array[starts[:, None] + np.arange(length + 1)].astype(np.int64)
        self.tokens.release(starts, length + 1)
        return gathered

    def every_window(self, length: int) -> np.ndarray:
        """The positions of the windows that cut the stream without overlap."""
        return np.arange((len(self) - 1) // length, dtype=np.int64) * length


def split(count: int, parts: int, part: int) -> tuple[int, int]:
    """The bounds of piece `part` of `count` items cut into `parts` contiguous pieces."""
    base, extra = divmod(count, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


def generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class TokenLoaders:
    """`engine.Loaders` over token streams (see the module docstring)."""

    input_transform = None

    def __init__(
        self,
        streams: dict[str, Stream | None],
        info: engine.DataInfo,
        source: Any,
        settings: Any,
        seed: int,
        device: torch.device,
        rank: int,
        world_size: int,
    ) -> None:
        self.train_stream, self.val_stream, self.test_stream = streams["train"], streams["val"], streams["test"]
        self.info, self.length, self.random = info, source.block_size, source.windows == "random"
        self.batch_size, self.seed, self.device = settings["batch_size"], seed, device
        self.rank, self.world_size = rank, world_size
        self.pin = settings["pin_memory"] and device.type == "cuda"
        self.piece_size = -(-self.batch_size // world_size)
        self.windows_per_epoch = self.train_stream.every_window(self.length)
        self.shuffle, self.drop_last = settings["shuffle"], settings["drop_last"]
        count = len(self.windows_per_epoch)
        self.batches = count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)
        self.held = {
            name: self.held_out(stream, source.val_windows, settings["split_seed"])
            for name, stream in (("val", self.val_stream), ("test", self.test_stream))
        }

    def held_out(self, stream: Stream | None, count: int, split_seed: int) -> np.ndarray | None:
        """This process's piece of a held-out stream's windows: every one, or `count` drawn once."""
        if stream is None:
            return None
        positions = stream.every_window(self.length)
        if count and count < len(positions):
            drawn = torch.randint(0, len(stream) - self.length, (count,), generator=generator(split_seed, -1))
            positions = np.sort(drawn.numpy())
        low, high = split(len(positions), self.world_size, self.rank)
        return positions[low:high]

    def batch(self, stream: Stream, positions: np.ndarray) -> engine.Batch:
        """The windows at `positions` of `stream` as a batch on the device: inputs and targets [B, T]."""
        window = torch.from_numpy(stream.windows(positions, self.length))
        if self.pin:
            window = window.pin_memory()
        window = window.to(self.device, non_blocking=True)
        # Each its own contiguous tensor: a compiled runner (AOTInductor) reads a strided view's
        # memory as if it were contiguous, silently wrong.
        return engine.Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())

    def train(self, epoch: int, start: int = 0) -> Iterator[engine.Batch]:
        if self.random:
            return self.random_batches(start)
        return self.epoch_batches(epoch, start)

    def random_batches(self, start: int) -> Iterator[engine.Batch]:
        """Batch `index` of the endless stream: `batch_size` positions drawn from (seed, index),
        this process's piece of them."""
        low, high = split(self.batch_size, self.world_size, self.rank)
        last = len(self.train_stream) - self.length  # a window and its shifted targets fit
        index = start
        while True:
            drawn = torch.randint(0, last, (self.batch_size,), generator=generator(self.seed, index))
            yield self.batch(self.train_stream, drawn[low:high].numpy())
            index += 1

    def epoch_batches(self, epoch: int, start: int) -> Iterator[engine.Batch]:
        """The epoch's windows in its order, this process's piece of each of its batches."""
        count = len(self.windows_per_epoch)
        order = torch.randperm(count, generator=generator(self.seed, epoch)) if self.shuffle else torch.arange(count)
        for index in range(start, self.batches):
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            low, high = split(len(chosen), self.world_size, self.rank)
            yield self.batch(self.train_stream, self.windows_per_epoch[chosen[low:high].numpy()])

    def train_batches(self) -> int | None:
        return None if self.random else self.batches

    def shares(self) -> Sequence[float]:
        if self.random:
            return [1.0]  # every batch splits evenly (its size divides by the processes)
        count = len(self.windows_per_epoch)
        sizes = [min(self.batch_size, count - index * self.batch_size) for index in range(self.batches)]
        return [
            (high - low) * self.world_size / size
            for size in sizes
            for low, high in [split(size, self.world_size, self.rank)]
        ]

    def sample(self) -> engine.Batch:
        count = min(self.piece_size, SAMPLE_WINDOWS, len(self.windows_per_epoch))
        return self.batch(self.train_stream, self.windows_per_epoch[:count])

    def val(self) -> Iterator[engine.Batch] | None:
        return self.held_batches(self.val_stream, self.held["val"])

    def test(self) -> Iterator[engine.Batch] | None:
        return self.held_batches(self.test_stream, self.held["test"])

    def held_batches(self, stream: Stream | None, positions: np.ndarray | None) -> Iterator[engine.Batch] | None:
        if stream is None or positions is None:
            return None
        size = self.piece_size
        return (self.batch(stream, positions[start : start + size]) for start in range(0, len(positions), size))

    def close(self) -> None:
        files = {
            id(stream.tokens): stream.tokens
            for stream in (self.train_stream, self.val_stream, self.test_stream)
            if stream is not None
        }
        for tokens in files.values():
            tokens.close()
