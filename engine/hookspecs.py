"""Every hook of the engine, in the order a run calls them.

    register_settings        once per plugin: the settings (and their defaults) it owns
    register_components      once per plugin: its named components, and the default of a kind
    register_commands        once, by the command line: subcommands (evaluate, export, runs, ...)
    -- the setup chain (engine.setup; nothing is written yet) --
    (the distributed component: joins the processes of a data-parallel run, if any)
    (the data component)
    build_loaders            firstresult: batch iterators over the data (this process's slice)
    (the model, loss and precision components; the model laid out over the processes, which
     FSDP2 shards (engine.Distributed.distribute); the optimizer component on its parameters)
    wrap_model               chained: DDP, an averaging wrapper; the step calls the result
    (the accelerate component)
    wrap_optimizer           chained: then the accelerate component's optimizer
    (the scheduler component, built on the final optimizer)
    (restore from a checkpoint, when resuming, into these final objects: see read_checkpoint)
    load_plugin_state        the plugins' own state from that checkpoint
    skip_per_step            per plugin: True leaves its per-step and per-epoch hooks unbound
    wrap_step                chained: then the accelerate component's step wraps them all
    (the check: a sample of the training data as validation runs it, RNG kept)
        before_forward, compute_loss, compute_metrics
    -- the run (Trainer.fit) --
    (the run directory: created with config.toml and a "running" summary.json, or the resumed one)
    on_run_start             once, before the first epoch
    for each epoch:
        for each batch:                  -- inside the train step, tensor work only --
            before_forward               chained: may replace the batch
            (forward and the [loss] component's term, under precision's autocast)
            compute_loss                 extra loss terms, summed with the main one
            compute_metrics              per-batch training metrics (log.train_metrics), no grad
            (zero grads on a window's first batch; backward of loss x window scale)
            before_optimizer_step        only on a window's last batch, after unscaling
            (optimizer step)             through the precision's gradient scaler, if any
                                         -- host side, after the step returns --
            (a per-step scheduler steps after a window's last batch)
            after_step
            at a point counted in steps within the epoch (val_every_steps, log.every_steps,
            the run's last step): validation and the logging point when due, as below, then
            on_interval_end              a stop request ends the run here
        validation, when due: before_forward, compute_loss and compute_metrics per batch
            after_validation             whole-set metrics
        (a logging point, when due: the losses read back once, checked finite, with the lr)
            on_log                       with the epoch's metrics
        (a per-epoch scheduler steps)
        on_epoch_end                     the state already points at the next epoch
    save_plugin_state        whenever a checkpoint is taken (Trainer.checkpoint)
    final_model              chained, once when the run completes or is interrupted
    (the test data evaluated on the final model; model.pt written from it)
    on_run_end               once, also when the run failed; every implementation runs
    (summary.json: "completed" (or a plugin's State.stop_status), "failed" or "interrupted")
    -- opening a run (--resume, engine.load, the after-training commands) --
    find_checkpoint          firstresult: the file of the run's last or best checkpoint
    read_checkpoint          firstresult: that checkpoint, read (also when a run resumes)

Whatever fails in the setup chain is a ConfigError (exit 2; nothing is written yet): the
exception of a hook names its plugin and hook. Once the run directory exists, from
`on_run_start` on, a failure is the run's (exit 1, with the epoch and step), and the run's files
record it.

Implementations take only the arguments they use, as in pytest, so adding an argument to a hook
breaks no plugin. Most hooks are called through pluggy and take its wrappers, ``firstresult``
and ``historic`` as pluggy documents them. The hooks in `ONE_BY_ONE` are called by the core one
implementation at a time, so a plugin that declares a wrapper there is refused at registration:
the per-step hooks, bound once at setup (a pluggy call costs about 2 us even with no
implementation: a tenth of the tutorial's step); the chained ones, where each implementation
receives what the previous one returned, which pluggy has no way to do; the registration hooks,
so that a clash names both plugins; `skip_per_step`, which unbinds one plugin's per-step hooks;
and `on_run_end`, whose every implementation runs even when another raised (pluggy stops at the
first exception, and what is left would keep files open).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import torch

from .steps import Window
from .types import Batch, Loaders, State, Step, TrainerView

if TYPE_CHECKING:
    from .cli import Commands

PROJECT = "engine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# The setup chain in the order the trainer runs it: component kinds the core builds
# (engine.components.CORE_KINDS) and the hooks between them. `python -m engine plugins` shows it.
SETUP_CHAIN = (
    "distributed",
    "data",
    "build_loaders",
    "model",
    "loss",
    "precision",
    "optimizer",
    "wrap_model",
    "accelerate",
    "wrap_optimizer",
    "scheduler",
    "wrap_step",
    "on_run_start",
)
# Called once per batch or per epoch (on the tutorial job an epoch is one step): bound at setup
# and called without pluggy's dispatch.
PER_STEP = frozenset(
    {
        "before_forward",
        "compute_loss",
        "before_optimizer_step",
        "after_step",
        "compute_metrics",
        "on_interval_end",
        "on_epoch_end",
    }
)
# Chained, with what each implementation must return (or None), for the next link and the loop.
CHAINED_TYPES: dict[str, type] = {
    "wrap_model": torch.nn.Module,
    "wrap_optimizer": torch.optim.Optimizer,
    "wrap_step": Callable,  # type: ignore[dict-item]
    "final_model": torch.nn.Module,
}
CHAINED = frozenset(CHAINED_TYPES)
ONE_BY_ONE = PER_STEP | CHAINED | {"register_settings", "register_components", "skip_per_step", "on_run_end"}


# --- registration ----------------------------------------------------------------------------------


@hookspec
def register_settings() -> Mapping[str, Callable[..., Any]] | None:
    """Declare the settings this plugin owns, as ``{section: settings class}``.

    Called once per run, before the config is read. A settings class is a dataclass (any callable
    will do) whose keyword parameters are the keys: the default is the value when the config does
    not set it, the annotation its schema (``Literal[...]`` for choices,
    ``Annotated[float, engine.Range(gt=0)]`` for bounds; see engine/schema.py). Top-level keys
    are declared under the section ``""``. Two plugins declaring one key is an error naming both.
    Once the section is resolved the class is called with its values: a ``__post_init__`` raising
    ``engine.ConfigError`` (or ValueError) refuses the config, exit code 2, before anything is
    built (an enabled feature whose package is missing, keys that disagree).
    """


@hookspec
def register_components() -> Mapping[str, Mapping[str, Any]] | None:
    """Provide named components, as ``{kind: {name: factory}}``, and under the key ``"default"``
    the component of a kind to use when its section names none: ``{"default": {"loss": "mse"}}``.

    Called once per run, before the config is read. The core builds the kinds ``distributed``,
    ``data``, ``model``, ``loss``, ``optimizer``, ``precision``, ``accelerate`` and ``scheduler``
    in the setup chain (see the top of this module); plugins may add kinds of their own. The
    config section of the kind picks one by ``name``. The factory's keyword parameters are its
    settings (the rest of the section), typed by their annotations, except those named after the
    kind's run context, which receive it (engine.components.CORE_KINDS): ``device`` (distributed);
    ``seed``, ``device``, ``labelled`` and ``inferred`` (data); ``info`` (a :class:`DataInfo`) and
    ``device`` (model, loss); ``params`` and ``named_params`` (optimizer); ``device``
    (precision); ``trainer`` (accelerate); ``optimizer`` and ``length`` (a :class:`RunLength`,
    scheduler). Two plugins providing one name, or the default of one kind, is an error naming both.

    What factories return: distributed, a :class:`Distributed` or None (a single process); data,
    a ``(x, y)`` pair of tensors or arrays, a ``torch.utils.data.Dataset``, or
    ``{"train": ..., "val": ..., "test": ...}`` of those; model, an ``nn.Module``; loss, a callable
    ``(output, target) -> Tensor``, or an `engine.ModelLoss` (the loss the model returns);
    optimizer, a ``torch.optim.Optimizer``, built on ``params`` (a list of tensors; a factory may
    group them, with a setting per group, by their shapes or by the names ``named_params`` gives:
    ``(name, parameter)`` pairs of the model); precision, a
    :class:`Precision`; accelerate, an :class:`Acceleration` or None (the eager step); scheduler,
    a :class:`Scheduled` or None. The kind ``input_transform`` is chosen by no config section:
    its factory takes ``info`` and returns the module of an :class:`InputTransform`, into which
    `engine.load` loads the state a run saved.
    """


@hookspec
def register_commands(commands: Commands) -> None:
    """Add subcommands to ``python -m engine`` (an :class:`engine.cli.Commands`): ``evaluate``,
    ``export``, ``runs``, or options of an existing command, as ``--nproc`` is of ``run``.

    Called once by the command line, before it parses the arguments, with the plugins that
    ``--plugin`` and ``--block`` name. The core's commands are ``run``, ``config`` and
    ``plugins``; adding a command that exists is an error naming it. Its return is ignored.
    """


# --- the setup chain -----------------------------------------------------------------------------


@hookspec(firstresult=True)
def build_loaders(
    data: Any, config: Any, seed: int, device: torch.device, rank: int, world_size: int
) -> Loaders | None:
    """Turn what the data component returned into batch iterators on `device`.

    Called once per run, after the data component. ``data`` is the data component's return value,
    ``config`` the resolved config. With ``world_size`` processes (1: a single one), the loaders
    of process ``rank`` yield its slice of every batch of the seeded epoch order, and of the
    validation and test data. Return a :class:`Loaders`; the first non-None result wins.
    """


@hookspec
def wrap_model(model: torch.nn.Module, trainer: TrainerView) -> torch.nn.Module | None:
    """Wrap or replace the module the train step and validation call (DDP, weight averaging).

    Called once in the setup chain, after the model, loss, optimizer and precision components are
    built. Chained in hook order: each implementation receives what the previous one returned;
    return a module or None to keep it. ``trainer.module`` stays the model as built (what is
    checkpointed); ``trainer.model`` becomes the chain's result. The optimizer was built on
    ``trainer.module``'s parameters.
    """


@hookspec
def wrap_optimizer(optimizer: torch.optim.Optimizer, trainer: TrainerView) -> torch.optim.Optimizer | None:
    """Wrap or replace the optimizer (other constructor flags, a learning rate as a tensor).

    Called once in the setup chain, after `wrap_model` and before the scheduler is built, so the
    scheduler and a resumed run's optimizer state apply to the final optimizer. Chained in hook
    order; return an optimizer or None to keep it. ``engine.rebuild_optimizer`` makes a new one of
    the same class and parameters with changed flags. The accelerate component's optimizer comes
    last.
    """


@hookspec
def load_plugin_state(state: Mapping[str, Any], trainer: TrainerView) -> None:
    """Restore this plugin's state from a checkpoint: ``state`` holds what every plugin's
    `save_plugin_state` returned, merged; take your own key.

    Called in the setup chain when a run is resumed, after the model, optimizer, scheduler and loop
    state are restored. Its return is ignored.
    """


@hookspec
def skip_per_step(trainer: TrainerView) -> bool | None:
    """Return True when this plugin has nothing to do per step or per epoch in this run (its
    feature is off: gradient clipping at ``max_norm = 0``, accuracy on a regression task, a
    progress bar without a terminal), so the engine does not bind its implementations of the
    per-step hooks (`PER_STEP`): a feature that is off costs nothing per step.

    Called once in the setup chain, after the components are built and a checkpoint restored,
    before the step is assembled. Its other hooks are called as usual.
    """


@hookspec
def wrap_step(step: Step, trainer: TrainerView) -> Step | None:
    """Wrap or replace the train step; called once, last in the setup chain.

    ``step(batch, window)`` takes a :class:`Batch` and its :class:`Window` and returns
    ``(loss, terms)``: the detached total loss and a dict of detached loss terms, on the device.
    It is a function of its arguments: a compiled or captured step keys its graphs on the batch's
    shapes and the window. Chained in hook order, each wrapping what the previous one returned;
    return a function with the same contract or None to keep it. The accelerate component's step
    wraps the result. Document what your wrapper changes (for example, that a replayed CUDA graph
    overwrites its output tensors).
    """


# --- the run --------------------------------------------------------------------------------------


@hookspec
def on_run_start(trainer: TrainerView) -> None:
    """Called once when the run starts (`Trainer.fit`), after the setup chain, before the first epoch.

    ``trainer.run_dir`` exists, with the run's config.toml; ``trainer.state`` is the loop state
    (restored, when resuming). Open files and start timers here; check settings earlier (a
    component factory, or the setup chain's hooks), since an error here is a failure of the run
    (exit 1). Its return is ignored.
    """


# --- the train step (tensor work only: no .item(), no printing) ----------------------------------


@hookspec
def before_forward(batch: Batch, trainer: TrainerView) -> Batch | None:
    """Called inside the train step and in validation, before the model sees ``batch``.

    ``batch`` is on the run's device. Return a replacement :class:`Batch` (augmented, reshaped)
    or None to keep it; implementations are chained in hook order, each seeing what the previous
    one returned.
    """


@hookspec
def compute_loss(batch: Batch, output: torch.Tensor, trainer: TrainerView) -> Mapping[str, torch.Tensor] | None:
    """Called inside the train step and in validation, after the forward pass.

    Return extra loss terms ``{name: scalar tensor}`` (a regularizer, an auxiliary loss) or None.
    The optimized loss is the sum of the ``[loss]`` component's term and every term returned here;
    each term is logged under its name, so names must be unique.
    """


@hookspec
def compute_metrics(batch: Batch, output: torch.Tensor, trainer: TrainerView) -> Mapping[str, torch.Tensor] | None:
    """Called for each validation batch under ``torch.inference_mode()``, and (with
    ``log.train_metrics``, the default) inside each train step under ``torch.no_grad()``, where it
    is tensor work only; ``trainer.model.training`` says which.

    Return ``{name: scalar tensor}`` of per-batch means (accuracy): the engine averages them over
    the validation set, weighted by batch size, as ``val_<name>``, and over an epoch's steps as
    ``train_<name>``. A metric that is not a mean of batch means (F1, AUROC) accumulates here and
    is reported by `after_validation`.
    """


@hookspec
def before_optimizer_step(trainer: TrainerView) -> None:
    """Called inside the train step after backward and before the optimizer step.

    Only on the batch that closes a gradient-accumulation window; the gradients are already
    unscaled when a gradient scaler is in use. Use it for tensor work on the gradients
    (clipping). Its return is ignored.
    """


# --- host side ---------------------------------------------------------------------------------


@hookspec
def after_step(
    state: State, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], window: Window, trainer: TrainerView
) -> None:
    """Called after each train step, outside it, on the host.

    ``loss`` is the detached total loss of the step and ``terms`` its detached terms, both still
    on the device: reading a value (``.item()``) forces a host-device sync, so do it only when you
    must. ``state.step`` already counts this step; ``window.last`` says whether the optimizer
    stepped (a checkpoint is taken only there: within a window the gradients are half summed).
    Its return is ignored.
    """


@hookspec
def on_interval_end(step: int, state: State, trainer: TrainerView) -> None:
    """Called at each point counted in steps that falls within an epoch, after its validation and
    logging point when they are due there: every ``val_every_steps`` or ``log.every_steps``
    optimizer steps, and the run's last step when ``max_steps`` ends it within an epoch (of
    endless data, every such point). `on_epoch_end` takes a point that falls at an epoch's end.

    ``step`` is ``state.step``, the end of an accumulation window, so a checkpoint taken here
    resumes after it. Set ``state.stop = True`` to end the run here. Its return is ignored.
    """


@hookspec
def after_validation(trainer: TrainerView) -> Mapping[str, float | torch.Tensor] | None:
    """Called once after each validation's batches (and the test's), before its logging point.

    Return whole-set metrics ``{name: number or scalar tensor}`` computed from what this plugin
    accumulated in `compute_metrics` (precision, F1, AUROC); they are reported as ``val_<name>``
    beside the batch-size-weighted means. A name may be reported once. The values are read back
    to the host once per validation, with the means.
    """


@hookspec
def on_log(state: State, metrics: Mapping[str, float], trainer: TrainerView) -> None:
    """Called at each logging point with host-side ``metrics``, every value finite:

    - ``epoch`` and ``step``: where the logging point is;
    - ``loss``, and each loss term by its name: means over the steps since the last logging
      point, of the current epoch only in a run counted in epochs (a resumed run includes the
      steps taken before its checkpoint, which the checkpoint keeps);
    - ``train_<metric>``: the per-batch metrics of the train steps, averaged likewise;
    - ``lr``: the first parameter group's learning rate after the last step;
    - ``val_loss``, ``val_<term>`` and ``val_<metric>``: the last validation's, once the run has
      validated (absent before, and in a run with no validation data).

    The core calls it after reading the step losses back (one sync per logging point) and checking
    them. Loggers (console, files) implement it. Its return is ignored.
    """


@hookspec
def on_epoch_end(epoch: int, state: State, trainer: TrainerView) -> None:
    """Called after epoch ``epoch`` ended: its validation, logging point and epoch scheduler step
    are done, and ``state`` already points at the next epoch (``state.epoch == epoch + 1``,
    ``state.batch == 0``), so a checkpoint taken here resumes there.

    Set ``state.stop = True`` to end the run; with ``state.stop_status`` (a word of the plugin's,
    not one of the core's statuses: a search's ``"pruned"``) summary.json ends with that status
    instead of ``"completed"``, ``epochs_completed`` saying where. Its return is ignored.
    """


@hookspec
def save_plugin_state(trainer: TrainerView) -> Mapping[str, Any] | None:
    """Return this plugin's own state for a checkpoint, as ``{key: value}`` (by convention the
    plugin's name as the key), or None if it has none to save.

    Called whenever a checkpoint is taken (`Trainer.checkpoint`), at the end of an accumulation
    window or of an epoch. The values must hold only tensors, numbers, strings, lists, tuples and
    dicts of them: checkpoints load with ``torch.load(weights_only=True)``. Two plugins returning
    one key is an error naming it. `load_plugin_state` receives them back.
    """


@hookspec
def final_model(module: torch.nn.Module, ending: bool, trainer: TrainerView) -> torch.nn.Module | None:
    """Choose the model of the run: with ``ending``, the one it ends with (what `model.pt` holds,
    the test data is evaluated on and `engine.load` returns); without, the one it has now (what
    validation evaluates, and what a checkpoint keeps beside the trained weights for
    ``which = "best" | "last"``).

    Called with ``ending=True`` once, when the run completes or is interrupted, before the test and
    `model.pt`; with ``ending=False`` by `trainer.final_model()` (at every checkpoint, and by a
    plugin that keeps the model of an epoch). Chained: the first implementation receives
    ``trainer.module`` (the trained weights); return another module of the same architecture
    (the weights' average, an earlier epoch's) or None to keep what you received. Never change
    what you receive: the trained module goes on being checkpointed and trained.

    The order of the implementations does not matter, because each keeps to its kind:
    - one that derives the model from the trained weights (weight averaging) replaces ``module``
      only when it receives ``trainer.module`` itself, so that another's choice stands;
    - one that chooses among the models of earlier epochs (early stopping's best) returns its
      choice only when ``ending``, and chooses among what `trainer.final_model()` gave then.
    """


@hookspec
def on_run_end(trainer: TrainerView, error: BaseException | None) -> None:
    """Called once when the run ends: after the last epoch, after a failure, or after an
    interruption (``error`` is then an ``engine.Interrupted``). ``trainer.final_module`` is the
    model the run ended with (also in ``model.pt``), or None when it failed.

    Write summaries and close files here; what was logged before a failure must stay valid. Each
    implementation is called even when an earlier one raised; that exception becomes the run's
    ``error`` for the ones after it. Its return is ignored.
    """


# --- opening a run ----------------------------------------------------------------------------------


@hookspec(firstresult=True)
def find_checkpoint(run_dir: Path, which: str) -> Path | None:
    """The file of run `run_dir`'s checkpoint `which`: ``"last"`` (what ``--resume`` continues
    from) or ``"best"`` (by the monitored metric). Return None when the run has none; the first
    non-None result wins.

    Called when a run is resumed and when one is opened (`engine.load`, the after-training
    commands with ``--which``), without a trainer. The path must be inside ``run_dir``.
    """


@hookspec(firstresult=True)
def read_checkpoint(path: Path, template: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The checkpoint at `path` (what `find_checkpoint` answered) as `Trainer.checkpoint` made it,
    read by the plugin that wrote it; None for a path it did not write, which the core then reads
    as one ordinary checkpoint file (``torch.load``, weights only). The first non-None result wins.

    ``template`` holds the tensors to read the model's state into (``"model"``) and, when a run
    resumes, the optimizer's (``"optimizer"``), shaped as `engine.Distributed.state` gives them:
    a sharded checkpoint is read into them, each process its own shards, whatever number of
    processes wrote it (torch.distributed.checkpoint reshards). Called by every process of a
    resumed run, in the setup chain, and when a run is opened (`engine.load`, ``--which last``
    or ``best``) in a single process. A checkpoint that does not fit is a ConfigError naming it.
    """
