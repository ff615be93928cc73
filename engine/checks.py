"""The setup chain's last link, the check of a sample of the training data, and the errors the
setup: one line naming the plugin and hook, the model or the loss at fault."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .calling import described
from .errors import ConfigError, EngineError, Interrupted, TrainingError, one_line
from .types import Batch


def check_sample(trainer: Any) -> None:
    """A sample of the training data (`Loaders.sample`) through the before_forward hooks, the model
    (`module`: a wrapper changes how it runs, not what it outputs, and may talk to other
    processes), every loss term and the metrics, as validation runs them (eval mode, no gradients),
    with every RNG kept. A model, loss, hook or metric that does not fit the data, or returns what
    the loop cannot use, fails here as a ConfigError naming it, before anything is written."""
    with kept_rng(trainer.device), torch.inference_mode(), in_eval_mode(trainer.model, trainer.module):
        batch = trainer.loaders.sample()
        for plugin, hook in trainer.plugins.bind_by_plugin("before_forward", trainer=trainer, without=trainer.off):
            batch = expect(hook(batch=batch), Batch, f"plugin {plugin!r}: hook before_forward") or batch
        with trainer.precision.autocast():
            output, returned = sample_output(trainer, batch)
            sample_loss(trainer, batch, output, returned)
        for plugin, hook in trainer.plugins.bind_by_plugin("compute_metrics", trainer=trainer, without=trainer.off):
            numbers(hook(batch=batch, output=output), f"plugin {plugin!r}: hook compute_metrics")
        # Ended as a validation is: what plugins accumulated for the sample is reported (and checked)
        # and gone before the first real validation.
        numbers(whole_set_metrics(trainer), "hook after_validation")


def sample_output(trainer: Any, batch: Batch) -> tuple[Any, Any]:
    """The model's output on the sample, called as the step calls it (engine/calling.py), and what
    it returned; a ConfigError when the output is not a tensor (a tuple whose logits
    ``model.output`` does not pick)."""
    name = trainer.config["model"]["name"]
    try:
        output, returned = trainer.call(trainer.module, batch)
    except Exception as error:
        what = f"model {name!r} failed on inputs {shape(batch.x)}"
        raise sample_error(trainer.plugins, error, what) from error
    if not isinstance(output, torch.Tensor):
        picked = f" (model.output = {trainer.config['model']['output']!r} picks it)" if output is not returned else ""
        raise ConfigError(
            f"model {name!r} returns {described(returned)}, whose output{picked} is not a tensor: pick its logits "
            'with model.output (an index, "0", or a key or attribute, "logits")'
        )
    return output, returned


def sample_loss(trainer: Any, batch: Batch, output: Any, returned: Any) -> None:
    """The `[loss]` component's term, then each `compute_loss` hook's, each checked."""
    try:
        loss = trainer.loss_fn(returned) if trainer.model_loss else trainer.loss_fn(output, batch.y)
    except ConfigError:  # what loss.output picks is not there
        raise
    except Exception as error:
        what = f"loss {trainer.loss_name!r} failed on outputs {shape(output)} and targets {shape(batch.y)}"
        raise sample_error(trainer.plugins, error, what) from error
    numbers({trainer.loss_name: loss}, f"loss {trainer.loss_name!r}")
    names = {trainer.loss_name}
    for plugin, hook in trainer.plugins.bind_by_plugin("compute_loss", trainer=trainer, without=trainer.off):
        who = f"plugin {plugin!r}: hook compute_loss"
        for name in numbers(hook(batch=batch, output=output), who):
            if name in names:
                raise ConfigError(f"{who} returned a second loss term named {name!r}")
            names.add(name)


def whole_set_metrics(trainer: Any, taken: Any = ()) -> dict[str, torch.Tensor]:
    """What every `after_validation` implementation returns, merged; a name reported twice (or
    also by `compute_metrics`, among `taken`) is an error."""
    merged: dict[str, torch.Tensor] = {}
    for metrics in trainer.hooks.after_validation(trainer=trainer):
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"hook after_validation returned {returned(metrics)}, not None or a dict")
        for name, value in metrics.items():
            if name in merged or name in taken:
                raise TrainingError(f"hook after_validation: a second metric named {name!r}")
            merged[name] = torch.as_tensor(value).detach()
    return merged


@contextlib.contextmanager
def in_eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule of `modules` in eval mode during the block (as hooks see it in validation:
    ``trainer.model.training``), then in the mode it had."""
    every = list(dict.fromkeys(sub for module in modules for sub in module.modules()))
    modes = [module.training for module in every]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(every, modes):
            module.training = mode


def sample_error(plugins: Any, error: Exception, what: str) -> Exception:
    """The error of the model or the loss on the sample, as a ConfigError saying so; one from a
    plugin's hook is the setup's (`setup_error`)."""
    if isinstance(error, TrainingError):  # the loss's own message (it names the loss)
        return ConfigError(f"on a sample of the training data: {error}")
    if isinstance(error, EngineError):
        return error
    culprit = plugins.blame(error.__traceback__)
    if culprit is not None and culprit[1]:
        return setup_error(plugins, error)
    return ConfigError(f"on a sample of the training data: {what}: {one_line(error)}")


def setup_error(plugins: Any, error: Exception) -> ConfigError:
    """A ConfigError for an exception in the setup chain, naming the plugin and hook it came from."""
    message = str(error) if isinstance(error, EngineError) else one_line(error)
    culprit = plugins.blame(error.__traceback__)
    if culprit is None:
        return ConfigError(message if isinstance(error, EngineError) else f"setup failed: {message}")
    plugin, hook = culprit
    return ConfigError(f"plugin {plugin!r} failed" + (f" in hook {hook}" if hook else "") + f": {message}")


def explain(trainer: Any, error: BaseException) -> BaseException:
    """A TrainingError naming the epoch, the step and, if one raised it, the plugin and hook;
    a ConfigError only while the run's directory does not exist yet."""
    state = trainer.state
    if isinstance(error, Interrupted):
        error.where(state)
        return error
    if not state.step:
        where = "at the start of the run"
    elif state.batch:
        where = f"epoch {state.epoch}, step {state.step}"
    else:  # between epochs: the state already points at the next one
        where = f"end of epoch {state.epoch - 1}, step {state.step}"
    if isinstance(error, TrainingError) and not error.located:
        return TrainingError(f"{where}: {error}", located=True)
    # A ConfigError once the run's directory exists is a failure of the run (exit 1): exit 2
    # says that nothing was created.
    own = isinstance(error, ConfigError) and trainer.run_dir is not None
    if not own and (not isinstance(error, Exception) or isinstance(error, EngineError)):
        return error
    culprit = trainer.plugins.blame(error.__traceback__)
    if culprit:
        plugin, hook = culprit
        where += f": plugin {plugin!r}" + (f" failed in hook {hook}" if hook else "")
    explained = TrainingError(f"{where}: {error if own else one_line(error)}", located=True)
    explained.__cause__ = error
    return explained


def check_finite_row(names: tuple[str, ...], row: list[float], epoch: int, step: int) -> None:
    """A TrainingError naming the first loss term (then the total) of one step that is not finite."""
    for name, value in [*zip(names[1:], row[1:]), ("loss", row[0])]:
        if not math.isfinite(value):
            what = f"{name} ({value})" if name.startswith("train_") else f"loss ({value}) in term {name!r}"
            raise TrainingError(f"non-finite {what} at epoch {epoch}, step {step}; training stopped", located=True)


def check_finite(metrics: Mapping[str, float], epoch: int) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise TrainingError(f"non-finite {name} ({value}) at epoch {epoch}; training stopped", located=True)


def returned(value: Any) -> str:
    """What a hook or factory returned, in words: ``a dict``, ``None``."""
    return "None" if value is None else f"a {type(value).__name__}"


def expect(value: Any, kind: type, who: str) -> Any:
    """`value` if it is None or a `kind`; else a ConfigError saying what `who` returned."""
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{who} returned {returned(value)}, not None or an engine.{kind.__name__}")
    return value


def numbers(value: Any, who: str) -> Mapping[str, torch.Tensor]:
    """`value` if it is None or ``{name: a tensor of one number}`` (loss terms, metrics); else a
    ConfigError saying what `who` returned."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{who} returned {returned(value)}, not None or {{name: a tensor of one number}}")
    for name, number in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"{who} returned the name {name!r}, not a string")
        if not (isinstance(number, torch.Tensor) and number.numel() == 1):
            what = f"a tensor of shape {shape(number)}" if isinstance(number, torch.Tensor) else returned(number)
            raise ConfigError(f"{who} returned {what} for {name!r}, not a tensor of one number")
    return value


def shape(tensor: Any) -> str:
    """A tensor's shape and dtype, as error messages show it: ``(8, 3) float32``."""
    if isinstance(tensor, torch.Tensor):
        return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
    return f"of type {type(tensor).__name__}"


@contextlib.contextmanager
def kept_rng(device: torch.device) -> Iterator[None]:
    """Every RNG (python, numpy, torch, the run's CUDA device) as it was before the block."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
