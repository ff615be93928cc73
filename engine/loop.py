"""The training loop: setup, the train step, validation, and the loop that ties them together."""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from .config import Config, apply_overrides, load_job, plain, resolve
from .errors import ConfigError, EngineError, TrainingError
from .plugins import CONTEXT_PARAMS, Plugins, describe, make_plugins


class Batch(NamedTuple):
    """One batch: the model's input and the loss's target."""

    x: Any
    y: Any


@dataclass(slots=True, frozen=True)
class DataInfo:
    """What the model and loss factories may infer from the data."""

    n_features: int  # width of one input sample (its last dimension)
    n_outputs: int  # target width for regression, number of classes for classification
    task: str  # "regression" or "classification"
    n_train: int
    n_val: int = 0


class Loaders(Protocol):
    """Batch iterators over the training and validation data, built by `build_loaders`."""

    info: DataInfo

    def train(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` (1-based) from position `start`; the order depends only on (seed, epoch)."""

    def train_batches(self) -> int:
        """How many batches one training epoch has."""

    def val(self) -> Iterable[Batch] | None:
        """The validation batches, or None when there is no validation data."""


@dataclass(slots=True)
class State:
    """Where the loop is: enough, with the components' state, to resume a run exactly."""

    epoch: int = 1  # the current epoch, 1-based
    batch: int = 0  # batches started in the current epoch: the position in its data order
    step: int = 0  # batches started in total; during a step and its after_step, this step's number
    stop: bool = False  # set by a plugin to end the run after the current epoch
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged metrics
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's

    def state_dict(self) -> dict[str, Any]:
        """The loop position and every RNG state (python, numpy, torch, CUDA)."""
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "metrics": dict(self.metrics), "rng": rng}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.epoch, self.batch, self.step = saved["epoch"], saved["batch"], saved["step"]
        self.metrics = dict(saved["metrics"])
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass(slots=True)
class Result:
    """What `run` returns: the trained model, the final metrics and where the run's files are."""

    model: torch.nn.Module
    metrics: dict[str, float]
    run_dir: Path
    config: Config
    state: State


def total(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the loss terms (no extra op for a single term)."""
    values = iter(terms.values())
    loss = next(values)
    for value in values:
        loss = loss + value
    return loss


class Trainer:
    """One run: its config, plugins, components and state. Built by `run` or `setup`."""

    def __init__(self, config: Config, plugins: Plugins) -> None:
        self.config, self.plugins, self.hooks = config, plugins, plugins.hook
        self.epochs: int = config["epochs"]
        self.accumulation: int = config["grad_accumulation"]
        self.val_every: int = config["val_every"]
        self.device = resolve_device(config["device"])
        self.run_dir = run_directory(config["runs_dir"], config["run_name"])
        seed_everything(config["seed"])
        data = self.build("data", seed=config["seed"], device=self.device)
        loaders = self.hooks.build_loaders(data=data, config=config, seed=config["seed"], device=self.device)
        if loaders is None:
            raise ConfigError("no plugin implements build_loaders: nothing can batch the data")
        self.loaders: Loaders = loaders
        self.info: DataInfo = loaders.info
        self.batches_per_epoch = loaders.train_batches()
        self.has_validation = loaders.val() is not None
        torch.manual_seed(config["seed"])  # model init must not depend on what the data consumed
        self.model: torch.nn.Module = self.build("model", info=self.info, device=self.device).to(self.device)
        self.loss_name: str = config["loss"]["name"].rpartition(":")[2]
        self.loss_fn: Callable[[Any, Any], torch.Tensor] = self.build("loss", info=self.info, device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer = self.build("optimizer", params=params)
        self.scheduler: Any = None  # a plugin that schedules the learning rate sets it, for checkpoints
        # A precision plugin sets these in on_run_start: the context entered around forward and
        # loss (autocast), and a gradient scaler (GradScaler, for fp16) used for backward and step.
        self.autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.scaler: torch.amp.GradScaler | None = None
        self.state = State()
        # Per-step and per-epoch hooks are resolved once here; see engine.plugins.BOUND_HOOKS.
        self._before_forward = plugins.bind("before_forward", trainer=self)
        self._compute_loss = plugins.bind("compute_loss", trainer=self)
        self._before_optimizer_step = plugins.bind("before_optimizer_step", trainer=self)
        self._after_step = plugins.bind("after_step", trainer=self, state=self.state)
        self._compute_metrics = plugins.bind("compute_metrics", trainer=self)
        self._on_epoch_end = plugins.bind("on_epoch_end", trainer=self, state=self.state)
        self.step: Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]] = self.train_step

    def build(self, kind: str, **context: Any) -> Any:
        """Build the component the config's `[kind]` section names, passing the context it asks for."""
        section = self.config[kind]
        component = self.plugins.component(kind, section["name"])
        arguments = section.component_settings()
        try:
            wanted = inspect.signature(component.factory).parameters
        except (TypeError, ValueError):
            wanted = {}
        arguments.update({name: value for name, value in context.items() if name in wanted and name in CONTEXT_PARAMS})
        try:
            return component.factory(**arguments)
        except EngineError:
            raise
        except Exception as error:
            source = f" (plugin {component.plugin!r})" if component.plugin else ""
            raise ConfigError(f"{kind} {section['name']!r}{source} cannot be built: {describe(error)}") from error

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch: before_forward, forward, loss terms, zero grad, backward, optimizer step.

        Tensor work only, so that acceleration plugins can compile or capture it whole. Returns the
        detached total loss and terms, still on the device.
        """
        for hook in self._before_forward:
            batch = hook(batch=batch) or batch
        with self.autocast():
            terms = self.loss_terms(batch, self.model(batch.x))
            loss = total(terms)
        first, last, scale = self.accumulation_window()
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        scaled = loss if scale == 1 else loss * scale
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        if last:
            for hook in self._before_optimizer_step:
                hook()
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                self.scaler.update()
        detached = loss.detach()
        if len(terms) == 1:
            return detached, {self.loss_name: detached}
        return detached, {name: term.detach() for name, term in terms.items()}

    def loss_terms(self, batch: Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `[loss]` component's term plus every term `compute_loss` returns."""
        terms = {self.loss_name: self.loss_fn(output, batch.y)}
        for hook in self._compute_loss:
            extra = hook(batch=batch, output=output)
            if extra:
                for name in extra:
                    if name in terms:
                        raise TrainingError(f"hook compute_loss: two loss terms are named {name!r}")
                terms.update(extra)
        return terms

    def accumulation_window(self) -> tuple[bool, bool, float]:
        """Whether this batch opens and closes its gradient-accumulation window, and the loss scale.

        A window never spans two epochs; the last one of an epoch may be shorter.
        """
        if self.accumulation == 1:
            return True, True, 1
        position = self.state.batch - 1  # the loop counts the batch before the step runs
        start = position - position % self.accumulation
        size = min(self.accumulation, self.batches_per_epoch - start)
        return position == start, position == start + size - 1, 1.0 / size

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Mean loss terms and metrics over the validation data, with one host-device sync."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in self.loaders.val() or ():
            for hook in self._before_forward:
                batch = hook(batch=batch) or batch
            output = self.model(batch.x)
            terms = self.loss_terms(batch, output)
            values = {"loss": total(terms), **terms}
            for hook in self._compute_metrics:
                values.update(hook(batch=batch, output=output) or {})
            size = len(batch.y)
            for name, value in values.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * size
            count += size
        self.model.train()
        if not sums:
            return {}
        means = (torch.stack(list(sums.values())) / count).tolist()  # host-device sync
        return {f"val_{name}": mean for name, mean in zip(sums, means)}

    def fit(self) -> Result:
        """Run the loop; `on_run_end` is called whether it finishes or fails."""
        error = None
        try:
            self.hooks.on_run_start(trainer=self)
            for wrap in self.plugins.bind("wrap_step", trainer=self):
                self.step = wrap(step=self.step) or self.step
            self.loop()
        except BaseException as raised:
            error = self.explain(raised)
        finally:
            try:
                self.hooks.on_run_end(trainer=self, error=error)
            except Exception as raised:
                error = error or self.explain(raised)
        if error is not None:
            raise error
        return Result(self.model, dict(self.state.metrics), self.run_dir, self.config, self.state)

    def loop(self) -> None:
        """The tutorial's loop: epochs of steps, then validation when due and the epoch-end hooks."""
        state = self.state
        while state.epoch <= self.epochs and not state.stop:
            # Module.train() walks every submodule (5 µs for Linear(1, 1), a step on the tutorial);
            # only validation or a plugin turns training off, so only then is it worth the walk.
            if not self.model.training:
                self.model.train()
            for batch in self.loaders.train(state.epoch, start=state.batch):
                state.batch += 1
                state.step += 1
                loss, terms = self.step(batch)
                for hook in self._after_step:
                    hook(loss=loss, terms=terms)
            if self.has_validation and (state.epoch % self.val_every == 0 or state.epoch == self.epochs):
                state.val_metrics = self.validate()
            for hook in self._on_epoch_end:
                hook()
            state.epoch, state.batch = state.epoch + 1, 0

    def explain(self, error: BaseException) -> BaseException:
        """A TrainingError naming the epoch, the step and, if one raised it, the plugin and hook."""
        where = f"epoch {self.state.epoch}, step {self.state.step}" if self.state.step else "at the start of the run"
        if isinstance(error, TrainingError) and not error.located:
            return TrainingError(f"{where}: {error}", located=True)
        if not isinstance(error, Exception) or isinstance(error, EngineError):
            return error
        culprit = self.plugins.blame(error.__traceback__)
        if culprit:
            plugin, hook = culprit
            where += f": plugin {plugin!r}" + (f" failed in hook {hook}" if hook else "")
        explained = TrainingError(f"{where}: {describe(error)}", located=True)
        explained.__cause__ = error
        return explained


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, *, tensor_lr: bool = False, **changes: Any
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over the same parameter groups, with `changes` applied.

    For acceleration plugins that need other constructor flags (``capturable``, ``fused``) or the
    learning rate as a device tensor (`tensor_lr`: a scheduler then writes it in place, which a
    compiled or captured step follows). The optimizer state is not carried over: rebuild before
    the first step.
    """
    device = optimizer.param_groups[0]["params"][0].device
    accepted = inspect.signature(type(optimizer).__init__).parameters

    def changed(settings: Mapping[str, Any]) -> dict[str, Any]:
        updated = {**settings, **changes}
        if tensor_lr:
            updated["lr"] = torch.tensor(float(settings["lr"]), device=device)
        return updated

    groups = [changed(group) for group in optimizer.param_groups]
    # Only what the constructor takes: `defaults` may hold keys a subclass fixes (AdamW's
    # decoupled_weight_decay in torch 2.13).
    defaults = {key: value for key, value in changed(optimizer.defaults).items() if key in accepted}
    return type(optimizer)(groups, **defaults)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def run_directory(runs_dir: str, run_name: str) -> Path:
    """``runs_dir/run_name``; an unnamed run gets a fresh timestamped name."""
    if run_name:
        return Path(runs_dir) / run_name
    stem = time.strftime("%Y%m%d-%H%M%S")
    path, suffix = Path(runs_dir) / stem, 1
    while path.exists():
        suffix += 1
        path = Path(runs_dir) / f"{stem}-{suffix}"
    return path


def load_config(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
) -> tuple[Config, Plugins]:
    """Resolve a job (a dict, a TOML path, a Config, or None for the defaults) and its plugins."""
    if isinstance(job, Config):
        job = job.to_dict()
    elif isinstance(job, (str, Path)):
        job = load_job(job)
    merged = apply_overrides(job or {}, overrides)
    extra = [*plugins]
    listed = plain(merged.get("plugins", []))  # `--set plugins=[...]` gives an Override
    if not isinstance(listed, list):
        raise ConfigError(f"plugins: expected a list of module names, got {listed!r}")
    extra += [name for name in listed if name not in extra]
    found = make_plugins(extra, blocked)
    return resolve(merged, found), found


def setup(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
) -> Trainer:
    """A Trainer ready to `fit`, with a fresh plugin manager."""
    config, found = load_config(job, overrides, plugins, blocked)
    return Trainer(config, found)


def run(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
) -> Result:
    """Train the job and return the model and final metrics.

    `job` is a dict shaped like the TOML file, a path to one, a Config, or None for the default
    job. `plugins` are extra plugin objects or module names; `blocked` names plugins to skip.
    """
    return setup(job, overrides=overrides, plugins=plugins, blocked=blocked).fit()
