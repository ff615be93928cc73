"""The types every hook uses: the batch, its accumulation window, the data description, the loop
state, the pieces the setup chain produces, and the trainer's public surface (`TrainerView`).

They live apart from the trainer so that `hookspecs`, `plugins` and the trainer all import them
and none imports another in a circle.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import TrainingError
from .steps import RunLength, Window


class Batch(NamedTuple):
    """One batch: the model's input and the loss's target."""

    x: Any
    y: Any


@dataclass(slots=True, frozen=True)
class DataInfo:
    """What the model and loss factories may infer from the data."""

    n_features: int  # width of one input sample (its last dimension)
    n_outputs: int  # target width for regression, number of classes for classification
    # "regression", "classification" (class indices), "binary" (0/1 labels, one output) or
    # "sequence" (a class index per position: [N, T] targets for [N, T, n_outputs] outputs)
    task: str
    n_train: int
    n_val: int = 0
    n_test: int = 0
    threshold: float = 0.5  # binary: a sample whose probability of class 1 is above it is predicted 1
    # The shape of one input sample, as the model receives it without the batch dimension: (20,)
    # for rows of 20 features, (1, 8, 8) for one-channel 8x8 images (C, H, W). () where unknown
    # (a run recorded before it was): then one sample is `n_features` wide.
    input_shape: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()  # the classes' (or tokens') names, when the data names them: a vocabulary


class InputTransform(NamedTuple):
    """A module fitted on the training inputs (a standardization), which the model applies to its
    inputs first: the core puts it in front of the model the run trains, saves it with the
    weights, and rebuilds it for `engine.load` as the component `name` of kind ``input_transform``
    (whose factory takes ``info`` and returns the module, its state then loaded)."""

    name: str
    module: torch.nn.Module


class WithInputTransform(torch.nn.Module):
    """The model behind its input transform: what `trainer.module` is when the data has one."""

    def __init__(self, transform: torch.nn.Module, model: torch.nn.Module) -> None:
        super().__init__()
        self.transform, self.model = transform, model

    def forward(self, x: Any) -> Any:
        return self.model(self.transform(x))


@runtime_checkable  # what build_loaders returns is checked against it at setup
class Loaders(Protocol):
    """Batch iterators over the training, validation and test data, built by `build_loaders`.

    Batches come out on the run's device. With several processes, each process's loaders yield
    its slice of every batch (a batch is the global one: its count and order are every process's)
    and of the held-out data; `info` describes the whole data. ``input_transform`` is what the
    model applies first (fitted on the training split: a standardization), or None; the loaders
    give raw inputs either way.
    """

    info: DataInfo
    input_transform: InputTransform | None

    def train(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` (1-based) from position `start`; the order depends only on (seed, epoch).
        An endless stream has one epoch, whose batch at position p depends only on (seed, p)."""

    def train_batches(self) -> int | None:
        """How many batches one training epoch has; None when the training data is endless
        (windows at random positions, for ever): ``max_steps`` then ends the run."""

    def sample(self) -> Batch:
        """A few training samples as one batch on the device, read without touching the epochs'
        order or starting worker processes: what the setup chain checks the model and loss on."""

    def val(self) -> Iterable[Batch] | None:
        """The validation batches, or None when there is no validation data."""

    def test(self) -> Iterable[Batch] | None:
        """The test batches, evaluated once when the run completes; None when there is no test data."""

    def shares(self) -> Sequence[float]:
        """For each batch of an epoch, this process's samples x the number of processes / the
        batch's samples: 1.0 where a batch splits evenly, and always in a single process. An
        endless stream gives its batches' shares for one period, which repeats."""

    def close(self) -> None:
        """Release what the loaders hold (worker processes); called once when the run ends."""


class Distributed(Protocol):
    """The processes of the run: what the ``distributed`` component returns, or `OneProcess`.

    The core reads this process's place from it, lays the model out over the processes with it,
    takes the model's and optimizer's part of a checkpoint and the final weights through it, and
    reduces the logged losses and the validation sums with its collectives, each one call per
    logging point or validation.
    """

    rank: int  # this process's, 0 in a single process; rank 0 alone prints and writes files
    world_size: int  # the number of processes
    device: torch.device  # this process's device (on CUDA, the GPU of its local rank)
    sharded: bool  # each process holds shards of the model (FSDP2): all take part in a checkpoint

    def distribute(self, module: torch.nn.Module, precision: Precision) -> torch.nn.Module:
        """The model laid out over the processes, on this process's device; called once in the
        setup chain, after the precision component and before the optimizer is built on the
        result's parameters (FSDP2 replaces them with shards)."""

    def state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The model's and optimizer's part of a checkpoint, ``{"model": ..., "optimizer": ...}``:
        their state dicts; when `sharded`, this process's shards by parameter name (DCP's
        `get_state_dict`), which a checkpoint of any number of processes loads into."""

    def load_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
        """Load the ``"model"`` and ``"optimizer"`` of a checkpoint (shaped as `state` returns them)."""

    def full_weights(self, module: torch.nn.Module) -> dict[str, Any]:
        """The module's whole state dict in rank 0, what model.pt holds; when `sharded` every
        process calls it (a gather) and the others receive {}."""

    def stops(self, step: int) -> bool:
        """Whether a process asked to stop (a signal) stops at the end of this window, at step
        `step`: in a single process, yes. Rank 0 stops and the others learn it at their next
        collective; when `sharded`, they agree on one step, to take the last checkpoint together."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (a picklable object), on every process."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` summed (``op = "max"``: the maximum) over the processes, in place; returns it."""

    def failed(self, error: BaseException) -> BaseException:
        """The error this process stops with; called on every process whose run fails or is
        interrupted. `error` itself when it is the run's first (the others learn it from here, and
        this process shows it), else the error another process reported first: that process
        shows it, so here its ``shown`` is False."""

    def close(self) -> None:
        """Leave the process group: once, after `on_run_end`, or when the setup chain failed."""


class OneProcess:
    """The run in a single process: collectives that return what they are given, the whole model."""

    rank, world_size, sharded = 0, 1, False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def distribute(self, module: torch.nn.Module, precision: Precision) -> torch.nn.Module:
        return module.to(self.device)

    def state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": module.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
        module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])

    def full_weights(self, module: torch.nn.Module) -> dict[str, Any]:
        return module.state_dict()

    def stops(self, step: int) -> bool:
        return True

    def broadcast(self, value: Any) -> Any:
        return value

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def failed(self, error: BaseException) -> BaseException:
        return error

    def close(self) -> None:
        pass


class Scheduled(NamedTuple):
    """What a ``scheduler`` factory returns: the LR scheduler and when the core steps it."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_epoch: bool = False  # stepped after each epoch; else after each optimizer step


@dataclass(slots=True)
class Precision:
    """What a ``precision`` factory returns: the autocast dtype around forward and loss, and a
    gradient scaler (fp16), both used by the core's train step. The default is full precision."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None  # None: no autocast
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        # No cast cache: a CUDA graph must not capture casts of the weights cached at an earlier
        # step (PyTorch's CUDA-graph notes), and the weights are cast once per forward anyway.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)


Step = Callable[[Batch, Window], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@runtime_checkable  # what an accelerate factory returns is checked against it at setup
class Acceleration(Protocol):
    """What an ``accelerate`` factory returns: the last link of the optimizer and step chains."""

    # Seconds it costs once before its first fast step (a compile); `auto` tries it only on a run
    # long enough to pay it back.
    build_seconds: float

    def unavailable(self) -> str | None:
        """Why it cannot run here (a device it needs), in words; None when it can."""

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the accelerated step needs (called after every `wrap_optimizer`)."""

    def step(self, step: Step) -> Step:
        """The accelerated step (called after every `wrap_step`, so it wraps them all)."""


Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportFormat(Protocol):
    """What an ``export`` factory returns: one format a trained model is exported to, that can also
    serve `predict` and `evaluate` as a backend. What `write` produced is checked against the
    eager model (outputs within `tolerance` on inputs of several batch sizes up to `max_batch`)
    before it is reported as written."""

    suffix: str  # how the file's name ends: ".onnx", ".pt2"
    tolerance: float  # the largest difference from eager accepted, absolute and relative
    max_batch: int | None  # the largest batch the file takes (a TensorRT engine's); None: any
    # The order `--backend auto` tries formats in, highest first; None: auto never picks this one.
    auto_rank: int | None
    # Whether loading the file may run code it holds: a compiled library (AOTInductor), a program
    # whose graph names Python callables (torch.export). Such a file is loaded only from a run the
    # user trusts, or when this machine verified it; a format that does not say is taken to.
    runs_code: bool

    def missing(self) -> str | None:
        """What this machine lacks to write or run the format (one line saying what to install), or None."""

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        """Write the model to the file `path`: `program` is its ``torch.export`` trace (eval mode,
        on the CPU, the batch dimension dynamic), `example` the input batch it was traced with."""

    def load(self, path: Path) -> Runner:
        """The file as a function from a CPU batch to the model's float32 CPU output."""


@dataclass(slots=True)
class State:
    """Where the loop is: enough, with the components' state, to resume a run exactly."""

    epoch: int = 1  # the epoch being run, 1-based; past its end, the next one
    batch: int = 0  # batches started in the current epoch: the position in its data order
    step: int = 0  # batches started in total; during a step and its after_step, this step's number
    stop: bool = False  # set by a plugin: the run ends at the end of the epoch or the next point counted in steps
    # Set with `stop` by a plugin that ends the run for a reason of its own: the status summary.json
    # ends with instead of "completed" (a search's "pruned"), a word not among the core's. The run
    # ends as a completed one does otherwise: final model, test, model.pt.
    stop_status: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged metrics
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    test_metrics: dict[str, float] = field(default_factory=dict)  # the test at the end (data.test_fraction)
    val_step: int = 0  # the step the last validation ran at (0: none yet)
    seconds: float = 0.0  # training time before this process started (a resumed run's)
    # Each step's (epoch, step, loss, terms), on the device, since the last logging point.
    losses: list[tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=list)

    def monitored(self, name: str, key: str) -> float | None:
        """The metric `name` as measured at the current step (an epoch's end, a point counted in
        steps): a validation metric (``val_*``) by a validation at this step, any other by a
        logging point at it; None when this step measured none. A name the run does not produce,
        once it has validated (``val_*``) or logged (the others), is a TrainingError naming the
        setting `key` it came from (``checkpoint.monitor``)."""
        validated = name.startswith("val_")
        measured, at = (self.val_metrics, self.val_step) if validated else (self.metrics, self.metrics.get("step"))
        if name in measured:
            return measured[name] if at == self.step else None
        if measured:
            names = ", ".join(sorted({*self.metrics, *self.val_metrics} - {"epoch", "step"}))
            raise TrainingError(f"{key}: {name!r} is not a metric of this run ({names})")
        return None

    def state_dict(self) -> dict[str, Any]:
        """The loop position, the unlogged losses and every RNG state (python, numpy, torch, CUDA)."""
        rng: dict[str, Any] = {
            "python": _python_rng(random.getstate()),
            "numpy": _numpy_rng(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        losses = [
            {"epoch": epoch, "step": step, "loss": loss.detach().cpu(), "terms": _on(terms, "cpu")}
            for epoch, step, loss, terms in self.losses
        ]
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "metrics": dict(self.metrics),
            "val_metrics": dict(self.val_metrics),
            "val_step": self.val_step,
            "seconds": self.seconds,
            "losses": losses,
            "rng": rng,
        }

    def load_state_dict(self, saved: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        self.epoch, self.batch, self.step = saved["epoch"], saved["batch"], saved["step"]
        self.metrics, self.val_metrics = dict(saved["metrics"]), dict(saved["val_metrics"])
        self.val_step, self.seconds = saved.get("val_step", 0), saved["seconds"]
        self.losses = [
            (row["epoch"], row["step"], row["loss"].to(device), _on(row["terms"], device)) for row in saved["losses"]
        ]
        rng = saved["rng"]
        random.setstate(_python_rng_back(rng["python"]))
        np.random.set_state(_numpy_rng_back(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _on(terms: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {name: value.detach().to(device) for name, value in terms.items()}


# RNG states as plain lists, tensors and numbers, so that a checkpoint loads with weights_only=True.
def _python_rng(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _python_rng_back(saved: Any) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return version, tuple(int(value) for value in internal.tolist()), gauss


def _numpy_rng(state: tuple[Any, ...]) -> list[Any]:
    kind, keys, position, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _numpy_rng_back(saved: Any) -> tuple[Any, ...]:
    kind, keys, position, has_gauss, cached = saved
    return kind, keys.numpy().astype(np.uint32), position, has_gauss, cached


class TrainerView(Protocol):
    """The trainer's public surface: everything a hook may read (and, where said, set). Plugins
    annotate their ``trainer`` arguments with it; tests/test_border.py checks that they read
    nothing else.

    Set by the setup chain, in this order: ``distributed`` (the processes, with ``rank`` and
    ``world_size``), ``config``, ``device``, ``loaders``, ``info``, ``module``, ``loss_fn``,
    ``precision``, ``model``, ``optimizer``, ``scheduler``, ``train_step``. ``state`` is the loop
    state; a plugin may set ``state.stop`` (with ``state.stop_status``). ``run_dir`` exists from
    `on_run_start` on.
    """

    distributed: Distributed
    rank: int  # this process's (0 in a single process): rank 0 alone prints and writes files
    world_size: int  # the number of processes
    config: Any  # the resolved config (engine.Config), with [inferred] filled from the data
    device: torch.device
    epochs: int | None  # config["epochs"]: None when the run is counted in steps alone
    max_steps: int | None  # config["max_steps"], in optimizer steps
    length: RunLength  # how long the run is: its epochs, optimizer steps and train steps (batches)
    accumulation: int  # batches per optimizer step (config["grad_accumulation"])
    batches_per_epoch: int | None  # None: the training data is endless (random windows)
    loaders: Loaders
    info: DataInfo
    # The model the run trains: its factory's module, behind the data's input transform if any.
    # What is checkpointed, and what the optimizer was built on.
    module: torch.nn.Module
    model: torch.nn.Module  # what the step and validation call: `module` after every `wrap_model`
    loss_fn: Callable[[Any, Any], torch.Tensor]
    precision: Precision
    optimizer: torch.optim.Optimizer  # after every `wrap_optimizer` and the accelerate component's
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_step: Step  # after every `wrap_step` and the accelerate component's
    state: State
    run_dir: Path  # from on_run_start on
    resumed_from: Path | None  # the checkpoint a resumed run continues from
    final_module: torch.nn.Module | None  # the model the run ended with (`final_model`), at its end

    def build(self, kind: str, name: str | None = None, **context: Any) -> Any:
        """Build a component of `kind`: the config's choice, or `name` with its default settings."""

    def checkpoint(self) -> dict[str, Any]:
        """A checkpoint of the run now, at the end of an accumulation window or an epoch: what the
        plugin that keeps checkpoints writes (and `--resume` restores), as tensors and plain values;
        when ``distributed.sharded``, every process takes it and holds its shards of the model and
        optimizer."""

    def validate(
        self, batches: Iterable[Batch] | None = None, prefix: str = "val", model: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """The mean loss terms and metrics of `model` (default: `model`, as validation runs) over
        `batches` (default: the validation data), named ``<prefix>_<name>``: one host sync."""

    def final_model(self, ending: bool = False) -> torch.nn.Module:
        """The `final_model` chain run on the weights as they are now: the model validation
        evaluates (early stopping keeps the best of these); with `ending`, the one the run would
        end with if it ended here."""

    def elapsed(self) -> float:
        """Seconds of training so far, across the resumes of the run."""
