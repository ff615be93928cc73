"""The setup chain (engine/hookspecs.py), from the data to the wrapped step: each link fills in
the trainer what the next one builds on. Nothing is written."""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import resuming
from .calling import ModelLoss, model_call
from .checks import returned
from .config import Config
from .errors import ConfigError, one_line
from .hookspecs import CHAINED_TYPES
from .saved import read_checkpoint
from .step import build_step
from .steps import Window, clock_of, run_length
from .types import DataInfo, InputTransform, Loaders, Precision, Scheduled, State, WithInputTransform


def build_chain(trainer: Any, checkpoint: Path | None) -> None:
    """Every link of the setup chain, in order, on a trainer that holds its config, plugins and
    processes; `checkpoint` is restored into the final objects when the run resumes, once its
    record shows that the config and the data are the run's (engine/resuming.py)."""
    config = trainer.config
    trainer.epochs, trainer.max_steps = config["epochs"], config["max_steps"]
    trainer.accumulation, trainer.device = config["grad_accumulation"], trainer.distributed.device
    trainer.state = State()
    # What the checkpoint records besides the tensors (a sharded one's shards are read below).
    saved = dict(read_checkpoint(trainer.plugins, checkpoint, {})) if checkpoint is not None else None
    if saved is not None:
        allowed = resuming.check_config(trainer, saved, checkpoint)
    seed_everything(config["seed"])
    build_data(trainer)
    if saved is not None:
        resuming.check_data(trainer, saved, checkpoint, allowed)
    torch.manual_seed(config["seed"])  # model init must not depend on what the data consumed
    optimizer = build_components(trainer)
    wrap_components(trainer, optimizer)
    if saved is not None:
        if "model" not in saved:  # a sharded checkpoint: its shards, read into this run's tensors
            template = trainer.distributed.state(trainer.module, trainer.optimizer)
            saved.update(read_checkpoint(trainer.plugins, checkpoint, template))
        restore(trainer, saved, checkpoint)
    bind_hooks(trainer)
    step = chain(trainer, "wrap_step", "step", build_step(trainer))
    trainer.train_step = trainer.acceleration.step(step) if trainer.acceleration is not None else step


def build_data(trainer: Any) -> None:
    """The data component, then `build_loaders`; what the data tells is recorded in [inferred]."""
    seed, device = trainer.config["seed"], trainer.device
    data = trainer.build("data", seed=seed, device=device, inferred=trainer.config["inferred"])
    loaders = trainer.hooks.build_loaders(
        data=data, config=trainer.config, seed=seed, device=device, rank=trainer.rank, world_size=trainer.world_size
    )
    if loaders is None:
        raise ConfigError("no plugin implements build_loaders: nothing can batch the data")
    if not isinstance(loaders, Loaders):
        raise ConfigError(f"hook build_loaders returned {returned(loaders)}, not an engine.Loaders")
    trainer.loaders, trainer.info = loaders, loaders.info
    trainer.config = record_inferred(trainer.config, loaders.info, loaders.input_transform)
    trainer.batches_per_epoch = loaders.train_batches()
    trainer.shares = tuple(loaders.shares())  # this process's share of each batch: 1.0 in one process
    trainer.clock = clock_of(trainer.shares, trainer.batches_per_epoch, trainer.accumulation)
    trainer.length = run_length(trainer.clock, trainer.epochs, trainer.max_steps)
    trainer.last_step = trainer.length.batches
    trainer.has_validation = loaders.val() is not None


def build_components(trainer: Any) -> torch.optim.Optimizer:
    """The model (behind the data's input transform), the loss, the precision, the model laid out
    over the processes, and the optimizer on its parameters."""
    info, device = trainer.info, trainer.device
    model = trainer.build("model", info=info, device=device)
    transform = trainer.loaders.input_transform
    model = model if transform is None else WithInputTransform(transform.module, model)
    trainer.loss_name = trainer.config["loss"]["name"].rpartition(":")[2]
    trainer.loss_fn = trainer.build("loss", info=info, device=device)
    trainer.model_loss = isinstance(trainer.loss_fn, ModelLoss)
    # How the step calls the model (engine/calling.py): a dict of inputs goes in as keywords.
    keywords = isinstance(trainer.loaders.sample().x, Mapping)
    trainer.call = model_call(trainer.config["model"], keywords)
    trainer.precision = trainer.build("precision", device=device) or Precision(device.type)
    # Before the optimizer: FSDP2 replaces the parameters with this process's shards.
    trainer.module = trainer.distributed.distribute(model, trainer.precision)
    named = [(name, p) for name, p in trainer.module.named_parameters() if p.requires_grad]
    return trainer.build("optimizer", params=[p for _, p in named], named_params=named)


def wrap_components(trainer: Any, optimizer: torch.optim.Optimizer) -> None:
    """`wrap_model`, the accelerate component, `wrap_optimizer` and its optimizer, the scheduler."""
    trainer.model = chain(trainer, "wrap_model", "model", trainer.module)
    trainer.acceleration = acceleration = trainer.build("accelerate", trainer=trainer)
    if acceleration is not None and (reason := acceleration.unavailable()):
        raise ConfigError(f"accelerate.name = {trainer.config['accelerate']['name']!r}: {reason}")
    optimizer = chain(trainer, "wrap_optimizer", "optimizer", optimizer)
    trainer.optimizer = acceleration.optimizer(optimizer) if acceleration is not None else optimizer
    trainer.optimizer_step = trainer.optimizer.step  # before a scheduler wraps it: see engine/step.py
    scheduled: Scheduled | None = trainer.build("scheduler", optimizer=trainer.optimizer, length=trainer.length)
    trainer.scheduled, trainer.scheduler = scheduled, scheduled.scheduler if scheduled is not None else None
    if scheduled is not None:
        trainer.optimizer._opt_called = True  # type: ignore[attr-defined]  # the warning's flag: see engine/step.py


def bind_hooks(trainer: Any) -> None:
    """What runs per step and per epoch, resolved once: the hooks bound (engine.plugins), without
    the plugins whose feature is off in this run, and the scheduler where it steps."""
    skipping = trainer.plugins.bind_by_plugin("skip_per_step", trainer=trainer)
    trainer.off = {plugin for plugin, skip in skipping if skip()}
    bind = functools.partial(trainer.plugins.bind, trainer=trainer, without=trainer.off)
    trainer.before_forward, trainer.compute_loss = bind("before_forward"), bind("compute_loss")
    trainer.compute_metrics, trainer.before_optimizer_step = bind("compute_metrics"), bind("before_optimizer_step")
    trainer.after_step = bind("after_step", state=trainer.state)
    trainer.epoch_end = bind("on_epoch_end", state=trainer.state)
    trainer.interval_end = bind("on_interval_end", state=trainer.state)
    scheduled, trainer.epoch_scheduler = trainer.scheduled, None
    if scheduled is not None and scheduled.per_epoch:
        trainer.epoch_scheduler = scheduled.scheduler.step
    elif scheduled is not None:  # before the plugins' after_step: they see the step complete
        trainer.after_step.insert(0, scheduler_after_window(scheduled.scheduler))
    cadences(trainer)


def cadences(trainer: Any) -> None:
    """When validation and logging points are due: by epochs (`val_every`, `log.every`) and by
    optimizer steps (`val_every_steps`, `log.every_steps`); without a logging cadence, a tenth of
    the run, in steps when it is counted in steps. Then the first points after the state's step."""
    config, log = trainer.config, trainer.config["log"]
    trainer.val_every, trainer.val_every_steps = config["val_every"], config["val_every_steps"]
    trainer.log_every, trainer.log_every_steps = log["every"], log["every_steps"]
    if not (trainer.log_every or trainer.log_every_steps):
        if trainer.max_steps is None:
            trainer.log_every = max(1, trainer.epochs // 10)
        else:
            trainer.log_every_steps = max(1, trainer.length.total_steps // 10)
    trainer.plan()


def scheduler_after_window(scheduler: Any) -> Callable[..., None]:
    def step_scheduler(window: Window, **_: Any) -> None:
        if window.last:  # the optimizer stepped
            scheduler.step()

    return step_scheduler


def chain(trainer: Any, hook: str, argument: str, value: Any, **constants: Any) -> Any:
    """`value` passed through every implementation of a chained hook, in hook order; each returns
    what the next one receives (or None: unchanged)."""
    for plugin, link in trainer.plugins.bind_by_plugin(hook, trainer=trainer, **constants):
        returned_value = link(**{argument: value})
        expected = CHAINED_TYPES[hook]
        if returned_value is not None and not isinstance(returned_value, expected):
            raise ConfigError(
                f"plugin {plugin!r}: hook {hook} returned {returned(returned_value)}, not {expected.__name__}"
            )
        value = value if returned_value is None else returned_value
    return value


def restore(trainer: Any, saved: Mapping[str, Any], source: Path) -> None:
    """Load a checkpoint into the final objects of the setup chain (a ConfigError naming the file
    if it does not fit them), then give each plugin its state back."""
    trainer.resumed_from = source
    try:
        trainer.distributed.load_state(trainer.module, trainer.optimizer, saved)
        if trainer.scheduler is not None and saved["scheduler"] is not None:
            trainer.scheduler.load_state_dict(saved["scheduler"])
        if trainer.precision.scaler is not None and saved["scaler"] is not None:
            trainer.precision.scaler.load_state_dict(saved["scaler"])
        trainer.state.load_state_dict(saved["state"], trainer.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise ConfigError(f"checkpoint '{source}' does not fit this run: {one_line(error)}") from None
    resuming.continue_position(trainer, saved)
    trainer.hooks.load_plugin_state(state=saved["plugins"], trainer=trainer)


def record_inferred(config: Config, info: DataInfo, transform: InputTransform | None) -> Config:
    """The config with `[inferred]` filled from the data (so that config.toml rebuilds the model
    without the data); a size or task the config already sets must match the data."""
    inferred = {"n_features": info.n_features, "n_outputs": info.n_outputs, "task": info.task}
    inferred["input_shape"] = tuple(info.input_shape)
    inferred["classes"] = tuple(info.classes)
    for key, value in inferred.items():
        given = config["inferred"][key]
        if given not in (0, "", ()) and given != value:
            raise ConfigError(f"inferred.{key}: the job was written for {given!r}, but the data has {value!r}")
    chosen = {"threshold": info.threshold, "input_transform": transform.name if transform is not None else ""}
    return config.replace("inferred", {**inferred, **chosen})


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


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, *, tensor_lr: bool = False, **changes: Any
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over the same parameter groups, with `changes` applied.

    For `wrap_optimizer` implementations and accelerations that need other constructor flags
    (``capturable``, ``fused``) or the learning rate as a device tensor (`tensor_lr`: a scheduler
    then writes it in place, which a compiled or captured step follows). The setup chain builds
    the final optimizer before any state exists, and a resumed run's state is restored into it.
    """
    device = optimizer.param_groups[0]["params"][0].device
    accepted = inspect.signature(type(optimizer).__init__).parameters

    def changed(settings: Mapping[str, Any]) -> dict[str, Any]:
        updated = {**settings, **changes}
        if tensor_lr and not isinstance(settings["lr"], torch.Tensor):
            updated["lr"] = torch.tensor(float(settings["lr"]), device=device)
        return updated

    groups = [changed(group) for group in optimizer.param_groups]
    # Only what the constructor takes: `defaults` may hold keys a subclass fixes (AdamW's
    # decoupled_weight_decay in torch 2.13).
    defaults = {key: value for key, value in changed(optimizer.defaults).items() if key in accepted}
    return type(optimizer)(groups, **defaults)
