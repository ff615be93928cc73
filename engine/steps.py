"""How long a run is, and where its points counted in steps fall.

A run is counted in epochs, in optimizer steps (``max_steps``), or both (whichever ends first);
an endless data stream (random windows of a token file) has no epochs, so ``max_steps`` ends it.
Validation and logging points may be due by steps (``val_every_steps``, ``log.every_steps``).
These settings count optimizer steps; the loop counts train steps (batches, `State.step`), which
are the same unless ``grad_accumulation`` is above 1. `Clock` converts one to the other with the
accumulation windows of an epoch (a window never spans two epochs), so that every point falls at
the end of a window, where the gradients are whole and a checkpoint can be taken.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .errors import ConfigError

INFINITE = math.inf  # a point that never comes: no such cadence, or no such limit


class Window(NamedTuple):
    """Where a batch sits in its gradient-accumulation window, as the train step receives it.

    ``first``: the step zeroes the gradients before backward; ``last``: it runs the optimizer step;
    ``scale``: the loss is multiplied by it before backward (1 / the window's size, times this
    process's share of the batch). Hashable, so compiled and captured steps key their graphs on it.
    """

    first: bool
    last: bool
    scale: float


def windows(shares: Sequence[float], accumulation: int) -> tuple[Window, ...]:
    """The window of each batch position of an epoch: the one rule for gradient accumulation.

    `shares` is this process's share of each batch of the epoch (`Loaders.shares`: 1.0 in a single
    process). Windows hold `accumulation` batches and never span two epochs, so the last one of an
    epoch may be shorter (and its loss scale larger). The scale is multiplied by the share, so that
    the mean of the processes' gradients (DDP's) is the gradient of the whole batch.
    """
    batches, result = len(shares), []
    for start in range(0, batches, accumulation):
        size = min(accumulation, batches - start)
        result += [Window(i == 0, i == size - 1, shares[start + i] / size) for i in range(size)]
    return tuple(result)


class RunLength(NamedTuple):
    """How long the run is (engine/steps.py): what a scheduler factory receives as ``length``, and
    `TrainerView.length`. Optimizer steps are accumulation windows; train steps are batches."""

    epochs: int | None  # the whole epochs the run trains; None when max_steps ends it within one, or endless data
    steps_per_epoch: int | None  # optimizer steps per epoch; None: endless data
    total_steps: int  # optimizer steps of the whole run (what a schedule spans)
    batches: int  # train steps (batches) of the whole run: what `State.step` reaches


class Clock:
    """Optimizer steps and train steps (batches) of a run, one into the other.

    `period` is an epoch's windows, or for an endless stream one period of its batches' windows;
    `batches_per_epoch` is None for an endless stream.
    """

    def __init__(self, period: Sequence[Window], batches_per_epoch: int | None) -> None:
        self.period = tuple(period)
        self.batches_per_epoch = batches_per_epoch
        self.ends = [position + 1 for position, window in enumerate(self.period) if window.last]

    @property
    def steps_per_period(self) -> int:
        """Optimizer steps per period (an epoch, or a period of an endless stream)."""
        return len(self.ends)

    def batches(self, steps: int) -> int:
        """The train steps (batches) after which `steps` optimizer steps are done."""
        periods, rest = divmod(steps, len(self.ends))
        return periods * len(self.period) + (self.ends[rest - 1] if rest else 0)

    def steps(self, batches: int) -> int:
        """The optimizer steps done after `batches` train steps."""
        periods, rest = divmod(batches, len(self.period))
        return periods * len(self.ends) + bisect.bisect_right(self.ends, rest)

    def next(self, every: int, batches: int) -> float:
        """The train step (batch count) after `batches` at which the next multiple of `every`
        optimizer steps is done; INFINITE when `every` is 0 (no such cadence)."""
        if not every:
            return INFINITE
        return self.batches((self.steps(batches) // every + 1) * every)

    def windows_from(self, start: int) -> Iterable[Window]:
        """The windows of the batches from position `start` of an epoch (of an endless stream: of
        its one epoch, for ever)."""
        if self.batches_per_epoch is not None:
            return self.period[start:]
        return itertools.islice(itertools.cycle(self.period), start % len(self.period), None)


def clock_of(shares: Sequence[float], batches_per_epoch: int | None, accumulation: int) -> Clock:
    """The clock of a run whose loaders give `shares` (`Loaders.shares`: for an endless stream,
    its batches' shares, repeated) and `batches_per_epoch` (None: endless)."""
    if batches_per_epoch is None:  # a period of whole windows: the shares repeated `accumulation` times
        return Clock(windows(tuple(shares) * accumulation, accumulation), None)
    return Clock(windows(shares, accumulation), batches_per_epoch)


def run_length(clock: Clock, epochs: int | None, max_steps: int | None) -> RunLength:
    """How long the run is: until `epochs` end or `max_steps` optimizer steps are done, whichever
    comes first. An endless stream needs `max_steps` (a ConfigError naming it otherwise)."""
    per_epoch = clock.batches_per_epoch
    if per_epoch is None and max_steps is None:
        raise ConfigError(
            "max_steps: required, the training data is endless (random windows: it has no epochs to count)"
        )
    by_epochs = epochs * per_epoch if epochs is not None and per_epoch is not None else INFINITE
    by_steps = clock.batches(max_steps) if max_steps is not None else INFINITE
    batches = int(min(by_epochs, by_steps))
    whole = per_epoch is not None and batches % per_epoch == 0
    steps_per_epoch = clock.steps_per_period if per_epoch is not None else None
    return RunLength(batches // per_epoch if whole else None, steps_per_epoch, clock.steps(batches), batches)
