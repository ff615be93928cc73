"""The held-out splits of the data, and each process's part of every batch."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

import engine


def split_indices(
    n: int, labels: torch.Tensor | None, settings: Any
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
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        # A process's most samples of a batch: the batch of its held-out pieces too.
        self.piece_size = -(-batch_size // world_size)
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


def check_split(settings: Any, batch_size: int, part: Part, n_val: int, n_test: int = 0) -> None:
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
