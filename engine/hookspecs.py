"""Every hook of the engine, in the order a run calls them.

    register_settings        once, to collect the settings (and their defaults) each plugin owns
    register_components      once, to collect the named components (losses, optimizers, models, ...)
    build_loaders            once, after the data component is built (firstresult)
    on_run_start             once, after every component is built
    wrap_step                once, chained: acceleration plugins wrap or replace the train step
    for each epoch:
        for each batch:                  -- inside the train step, tensor work only --
            before_forward               chained: may replace the batch
            (forward; the [loss] component's term)      under trainer.autocast() (mixed precision)
            compute_loss                 extra loss terms, summed with the main one
            (zero grads; backward)
            before_optimizer_step        only on the batch that closes an accumulation window
            (optimizer step)             through trainer.scaler when a precision plugin sets one
                                         -- host side, after the step returns --
            after_step
        validation, when due: before_forward, compute_loss and compute_metrics per batch
        on_epoch_end
    on_log                   called by the plugin that reduces metrics, at each logging point
    on_run_end               once, also when the run failed

Implementations take only the arguments they use, as in pytest, so adding an argument to a hook
breaks no plugin. The hooks called per step or per epoch (`before_forward`, `compute_loss`,
`before_optimizer_step`, `after_step`, `compute_metrics`, `on_epoch_end`) are bound once at setup
and called without pluggy's dispatch; they therefore take no wrappers, and the engine refuses a
plugin that declares one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from .loop import Batch, Loaders, State, Trainer

PROJECT = "engine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- setup ---------------------------------------------------------------------------------------


@hookspec
def register_settings() -> Mapping[str, Mapping[str, Any]] | None:
    """Declare the settings this plugin owns, as ``{section: {key: default}}``.

    Called once per run, before the config is read. A top-level key is declared under the section
    ``""``. The type of each default is the type the key accepts (``None`` accepts anything). The
    key ``name`` of a component section (``loss.name``) sets which component is the default.
    Two plugins declaring the same key is an error that names both.
    """


@hookspec
def register_components() -> Mapping[str, Mapping[str, Callable[..., Any]]] | None:
    """Provide named components, as ``{kind: {name: factory}}``.

    Called once per run, before the config is read. Kinds the core builds: ``data``, ``model``,
    ``loss``, ``optimizer``; plugins may add their own (``scheduler``). The config section of the
    kind picks one by ``name``. The factory's keyword parameters with defaults are its settings
    (the rest of the section); parameters named after the run's context are passed that context
    instead: ``seed`` (data), ``info`` (model, loss: a :class:`DataInfo`), ``params`` (optimizer),
    ``optimizer`` and ``schedule`` (scheduler). Two plugins providing one name is an error naming
    both.

    What factories return: data, a ``(x, y)`` pair of tensors or arrays, a
    ``torch.utils.data.Dataset``, or ``{"train": ..., "val": ...}`` of those; model, an
    ``nn.Module``; loss, a callable ``(output, target) -> Tensor``; optimizer, a
    ``torch.optim.Optimizer``.
    """


@hookspec(firstresult=True)
def build_loaders(data: Any, config: Any, seed: int, device: torch.device) -> Loaders | None:
    """Turn what the data component returned into batch iterators.

    Called once per run. ``data`` is the data component's return value, ``config`` the resolved
    config. Return a :class:`Loaders`; the first non-None result wins.
    """


@hookspec
def on_run_start(trainer: Trainer) -> None:
    """Called once, after the model, optimizer and loaders are built and before the first epoch.

    ``trainer`` holds the config, the components and the :class:`State`. Its return is ignored.
    """


@hookspec
def wrap_step(step: Callable[[Batch], Any], trainer: Trainer) -> Callable[[Batch], Any] | None:
    """Called once, after `on_run_start`, to wrap or replace the train step.

    ``step`` takes a :class:`Batch` and returns ``(loss, terms)``: the detached total loss and a
    dict of detached loss terms, on the device. Return a function with the same contract (a
    compiled or CUDA-graph-captured step) or None to keep it. Implementations are chained in hook
    order, each wrapping what the previous one returned; document what your wrapper changes
    (for example, that a replayed CUDA graph overwrites its output tensors).
    """


# --- the train step (tensor work only: no .item(), no printing) ----------------------------------


@hookspec
def before_forward(batch: Batch, trainer: Trainer) -> Batch | None:
    """Called inside the train step and in validation, before the model sees ``batch``.

    Return a replacement :class:`Batch` (moved to the device, augmented) or None to keep it;
    implementations are chained in hook order, each seeing what the previous one returned.
    """


@hookspec
def compute_loss(batch: Batch, output: torch.Tensor, trainer: Trainer) -> Mapping[str, torch.Tensor] | None:
    """Called inside the train step and in validation, after the forward pass.

    Return extra loss terms ``{name: scalar tensor}`` (a regularizer, an auxiliary loss) or None.
    The optimized loss is the sum of the ``[loss]`` component's term and every term returned here;
    each term is logged under its name, so names must be unique.
    """


@hookspec
def before_optimizer_step(trainer: Trainer) -> None:
    """Called inside the train step after backward and before ``optimizer.step()``.

    Only on the batch that completes a gradient-accumulation window. Use it for tensor work on the
    gradients (clipping, unscaling). Its return is ignored.
    """


# --- host side ---------------------------------------------------------------------------------


@hookspec
def after_step(state: State, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], trainer: Trainer) -> None:
    """Called after each train step, outside it, on the host.

    ``loss`` is the detached total loss of the step and ``terms`` its detached terms, both still
    on the device: reading a value (``.item()``) forces a host-device sync, so do it only when you
    must. ``state.step`` already counts this step. Its return is ignored.
    """


@hookspec
def compute_metrics(batch: Batch, output: torch.Tensor, trainer: Trainer) -> Mapping[str, torch.Tensor] | None:
    """Called for each validation batch under ``torch.inference_mode()``.

    Return ``{name: scalar tensor}`` of per-batch means (accuracy); the engine averages them over
    the validation set, weighted by batch size, and reports them as ``val_<name>``.
    """


@hookspec
def on_epoch_end(state: State, trainer: Trainer) -> None:
    """Called after each epoch, after validation when it ran (``state.val_metrics`` holds it).

    Set ``state.stop = True`` to end the run after this epoch. Its return is ignored.
    """


@hookspec
def on_log(state: State, metrics: Mapping[str, float], trainer: Trainer) -> None:
    """Called at each logging point with host-side ``metrics`` (epoch, step, losses, validation).

    The plugin that reduces the step losses calls it; loggers (console, files) implement it.
    Its return is ignored.
    """


@hookspec
def on_run_end(trainer: Trainer, error: BaseException | None) -> None:
    """Called once when the run ends: after the last epoch, or after a failure (``error``).

    Write summaries and close files here; what was logged before a failure must stay valid.
    Its return is ignored.
    """
