"""The trainer: the setup chain, the train step, validation, the logging point and the loop."""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import random
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data

from . import runs
from .config import CORE_KINDS, OPTIONAL_KINDS, Config, load_config
from .errors import ConfigError, EngineError, Interrupted, TrainingError, one_line
from .plugins import Plugins
from .schema import MISSING, settings_of
from .types import (
    Acceleration,
    Batch,
    DataInfo,
    Distributed,
    Loaders,
    Precision,
    RunLength,
    Scheduled,
    Standardize,
    State,
    Step,
    Window,
    windows,
)


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
    """One run: its config, plugins, components and state. Built by `setup`, run by `fit`.

    The constructor is the setup chain (engine/hookspecs.py) after its first link, `distributed`
    (`setup` joins the processes of the run, if any, and hands it over): it builds every
    component, lets the chained hooks wrap them and restores `checkpoint` into the result, but
    writes nothing; `fit` creates the run directory (or continues `run_dir`) and runs the loop.
    """

    def __init__(
        self,
        config: Config,
        plugins: Plugins,
        *,
        run_dir: Path | None = None,
        checkpoint: Path | None = None,
        distributed: Distributed | None = None,
    ) -> None:
        self.config, self.plugins, self.hooks = config, plugins, plugins.hook
        try:
            self.build_chain(config, run_dir, checkpoint, distributed)
            self.check()
        except ConfigError:
            raise
        except Exception as error:  # nothing is written yet: whatever failed, it is the setup's
            raise self.setup_error(error) from error

    def build_chain(
        self, config: Config, run_dir: Path | None, checkpoint: Path | None, distributed: Distributed | None
    ) -> None:
        """The setup chain (engine/hookspecs.py), from the data to the wrapped step."""
        self.epochs: int = config["epochs"]
        self.accumulation: int = config["grad_accumulation"]
        self.val_every: int = config["val_every"]
        self.distributed = distributed
        self.device = distributed.device if distributed is not None else resolve_device(config["device"])
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed is not None else (0, 1)
        self.run_dir: Path | None = run_dir  # created when the run starts, unless it continues one
        self.resumed_from = checkpoint
        self.interrupted = 0  # the number of the signal that asked the run to stop
        self.state = State()
        seed = config["seed"]
        seed_everything(seed)

        data = self.build("data", seed=seed, device=self.device)
        loaders = self.hooks.build_loaders(
            data=data, config=config, seed=seed, device=self.device, rank=self.rank, world_size=self.world_size
        )
        if loaders is None:
            raise ConfigError("no plugin implements build_loaders: nothing can batch the data")
        if not isinstance(loaders, Loaders):
            raise ConfigError(f"hook build_loaders returned {returned(loaders)}, not an engine.Loaders")
        self.loaders: Loaders = loaders
        self.info: DataInfo = loaders.info
        self.config = record_inferred(config, self.info)
        self.batches_per_epoch: int = loaders.train_batches()
        # This process's share of each batch, with several: 1.0 unless a batch splits unevenly.
        self.shares = tuple(loaders.shares()) if self.world_size > 1 else None
        self.windows = windows(self.batches_per_epoch, self.accumulation, self.shares)
        self.has_validation = loaders.val() is not None
        torch.manual_seed(seed)  # model init must not depend on what the data consumed
        self.module: torch.nn.Module = self.build("model", info=self.info, device=self.device).to(self.device)
        self.loss_name: str = config["loss"]["name"].rpartition(":")[2]
        self.loss_fn: Callable[[Any, Any], torch.Tensor] = self.build("loss", info=self.info, device=self.device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = self.build("optimizer", params=params)
        self.precision: Precision = self.build("precision", device=self.device) or Precision(self.device.type)

        self.model: torch.nn.Module = self.chain("wrap_model", "model", self.module)
        acceleration = self.build("accelerate", trainer=self)
        optimizer = self.chain("wrap_optimizer", "optimizer", optimizer)
        self.optimizer = acceleration.optimizer(optimizer) if acceleration is not None else optimizer
        # torch's LR schedulers wrap `optimizer.step` to warn when a schedule steps before the
        # optimizer (pytorch#20124); Dynamo does not trace that wrapper (a graph break every
        # compiled step). The core steps them in the right order by construction, so the step
        # calls the optimizer's own `step`, taken before a scheduler wraps it.
        self.optimizer_step: Callable[[], Any] = self.optimizer.step
        length = RunLength(self.epochs, len([w for w in self.windows if w.last]))
        scheduled: Scheduled | None = self.build("scheduler", optimizer=self.optimizer, length=length)
        self.scheduler = scheduled.scheduler if scheduled is not None else None
        if self.scheduler is not None:
            self.optimizer._opt_called = True  # type: ignore[attr-defined]  # the warning's flag: see above
        if run_dir is not None:  # every process resumes from the checkpoint rank 0 found
            checkpoint = self.resumed_from = self.from_rank_zero(checkpoint)
        if checkpoint is not None:
            self.restore(runs.load(checkpoint, runs.CHECKPOINT_FORMAT), checkpoint)

        # What runs per step and per epoch, resolved once: bound hooks (engine.plugins.Plugins.bind),
        # without the plugins whose feature is off in this run, and the core's own parts only
        # where the run has them.
        self.off = off = {
            plugin for plugin, skip in self.plugins.bind_by_plugin("skip_per_step", trainer=self) if skip()
        }
        self.before_forward = self.plugins.bind("before_forward", trainer=self, without=off)
        self.compute_loss = self.plugins.bind("compute_loss", trainer=self, without=off)
        self.before_optimizer_step = self.plugins.bind("before_optimizer_step", trainer=self, without=off)
        self.after_step = self.plugins.bind("after_step", trainer=self, state=self.state, without=off)
        self.compute_metrics = self.plugins.bind("compute_metrics", trainer=self, without=off)
        self.after_validation = self.plugins.bind_by_plugin("after_validation", trainer=self)
        self.epoch_end = self.plugins.bind("on_epoch_end", trainer=self, state=self.state, without=off)
        self.train_step: Step = self.chain("wrap_step", "step", self.build_step())
        if acceleration is not None:
            self.train_step = acceleration.step(self.train_step)

        self.epoch_scheduler: Callable[[], Any] | None = None
        if scheduled is not None and scheduled.per_epoch:
            self.epoch_scheduler = scheduled.scheduler.step
        elif scheduled is not None:  # before the plugins' after_step: they see the step complete
            self.after_step.insert(0, self.step_scheduler_after_window(scheduled.scheduler))
        every = config["log"]["every"]
        self.log_every = every or max(1, self.epochs // 10)

    def check(self) -> None:
        """The setup chain's last link: a sample of the training data (`Loaders.sample`) through the
        before_forward hooks, the model as built (`module`: a wrapper changes how it runs, not
        what it outputs, and may talk to other processes), every loss term and the metrics, as
        validation runs them (eval mode, no gradients), with every RNG kept. A model, loss, hook or
        metric that does not fit the data, or returns what the loop cannot use, fails here as a
        ConfigError naming it, before anything is written."""
        with kept_rng(self.device), torch.inference_mode():
            batch = self.loaders.sample()
            modules = list(dict.fromkeys([*self.model.modules(), *self.module.modules()]))
            modes = [module.training for module in modules]
            self.model.eval()  # as hooks see it (trainer.model.training): as in validation
            self.module.eval()
            try:
                for plugin, hook in self.plugins.bind_by_plugin("before_forward", trainer=self, without=self.off):
                    batch = expect(hook(batch=batch), Batch, f"plugin {plugin!r}: hook before_forward") or batch
                with self.precision.autocast():
                    try:
                        output = self.module(batch.x)
                    except Exception as error:
                        what = f"model {self.config['model']['name']!r} failed on inputs {shape(batch.x)}"
                        raise self.sample_error(error, what) from error
                    try:
                        loss = self.loss_fn(output, batch.y)
                    except Exception as error:
                        what = f"loss {self.loss_name!r} failed on outputs {shape(output)} and targets {shape(batch.y)}"
                        raise self.sample_error(error, what) from error
                    numbers({self.loss_name: loss}, f"loss {self.loss_name!r}")
                    names = {self.loss_name}
                    for plugin, hook in self.plugins.bind_by_plugin("compute_loss", trainer=self, without=self.off):
                        who = f"plugin {plugin!r}: hook compute_loss"
                        for name in numbers(hook(batch=batch, output=output), who):
                            if name in names:
                                raise ConfigError(f"{who} returned a second loss term named {name!r}")
                            names.add(name)
                for plugin, hook in self.plugins.bind_by_plugin("compute_metrics", trainer=self, without=self.off):
                    numbers(hook(batch=batch, output=output), f"plugin {plugin!r}: hook compute_metrics")
                # Ended as a validation is: what plugins accumulated for the sample is reported (and
                # checked) and gone before the first real validation.
                for plugin, hook in self.after_validation:
                    numbers(hook(), f"plugin {plugin!r}: hook after_validation")
            finally:
                for module, mode in zip(modules, modes):
                    module.training = mode

    def sample_error(self, error: Exception, what: str) -> Exception:
        """The error of the model or the loss on the sample, as a ConfigError saying so; one from a
        plugin's hook is the setup's (`setup_error`)."""
        if isinstance(error, TrainingError):  # the loss's own message (it names the loss)
            return ConfigError(f"on a sample of the training data: {error}")
        if isinstance(error, EngineError):
            return error
        culprit = self.plugins.blame(error.__traceback__)
        if culprit is not None and culprit[1]:
            return self.setup_error(error)
        return ConfigError(f"on a sample of the training data: {what}: {one_line(error)}")

    def setup_error(self, error: Exception) -> ConfigError:
        """A ConfigError for an exception in the setup chain, naming the plugin and hook it came from."""
        message = str(error) if isinstance(error, EngineError) else one_line(error)
        culprit = self.plugins.blame(error.__traceback__)
        if culprit is None:
            return ConfigError(message if isinstance(error, EngineError) else f"setup failed: {message}")
        plugin, hook = culprit
        return ConfigError(f"plugin {plugin!r} failed" + (f" in hook {hook}" if hook else "") + f": {message}")

    def build(self, kind: str, name: str | None = None, **context: Any) -> Any:
        """Build the component of `kind` the config names (or `name`, with its default settings),
        passing the context it asks for. An optional kind with no component chosen builds None."""
        return build_component(self.config, self.plugins, kind, name, **context)

    def chain(self, hook: str, argument: str, value: Any) -> Any:
        """`value` passed through every implementation of a chained setup hook, in hook order;
        each returns what the next one receives (or None: unchanged)."""
        for plugin, wrap in self.plugins.bind_by_plugin(hook, trainer=self):
            wrapped = wrap(**{argument: value})
            if wrapped is not None and not isinstance(wrapped, CHAINED_TYPES[hook]):
                raise ConfigError(
                    f"plugin {plugin!r}: hook {hook} returned {returned(wrapped)}, not {CHAINED_TYPES[hook].__name__}"
                )
            value = value if wrapped is None else wrapped
        return value

    def checkpoint(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (it loads with weights_only=True):
        the model, optimizer, scheduler, gradient scaler, the loop state with every RNG, the
        gradients accumulated so far when taken inside an accumulation window, and the state each
        plugin returns from `state_dict`, keyed by plugin name."""
        scaler, state = self.precision.scaler, self.state
        inside_window = state.batch > 0 and not self.windows[state.batch - 1].last
        if inside_window and self.world_size > 1:
            # Each process holds its own part of the window's gradients until its last batch's
            # all-reduce: rank 0's alone would resume to another answer.
            raise TrainingError("with several processes, a checkpoint is taken at the end of an accumulation window")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        plugins = {}
        for plugin, state_dict in self.plugins.bind_by_plugin("state_dict", trainer=self):
            saved = state_dict()
            if saved is not None:
                plugins[plugin] = saved
        return {
            "format": runs.CHECKPOINT_FORMAT,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": state.state_dict(),
            "grads": [p.grad for p in params] if inside_window else None,
            "standardize": self.standardize_state(),
            "plugins": plugins,
        }

    def trained_model(self) -> dict[str, Any]:
        """The model file's content (model.pt): the weights and the input standardization, which
        `engine.load` rebuilds the inference model from."""
        state = {"format": runs.MODEL_FORMAT, "model": self.module.state_dict(), "step": self.state.step}
        return {**state, "standardize": self.standardize_state()}

    def standardize_state(self) -> dict[str, torch.Tensor] | None:
        standardize = self.loaders.standardize
        return None if standardize is None else {"mean": standardize.mean, "std": standardize.std}

    def restore(self, saved: Mapping[str, Any], source: Path) -> None:
        """Load a checkpoint into the final objects of the setup chain (a ConfigError naming the
        file if it does not fit them)."""
        try:
            self.module.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved["scheduler"] is not None:
                self.scheduler.load_state_dict(saved["scheduler"])
            if self.precision.scaler is not None and saved["scaler"] is not None:
                self.precision.scaler.load_state_dict(saved["scaler"])
            self.state.load_state_dict(saved["state"], self.device)
            if saved["grads"] is not None:
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                for param, grad in zip(params, saved["grads"], strict=True):
                    param.grad = None if grad is None else grad.to(param.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise ConfigError(f"checkpoint '{source}' does not fit this run: {one_line(error)}") from None
        for plugin, load_state_dict in self.plugins.bind_by_plugin("load_state_dict", trainer=self):
            if plugin in saved["plugins"]:
                load_state_dict(state=saved["plugins"][plugin])

    def build_step(self) -> Step:
        """The train step: before_forward, forward, loss terms, zero grad, backward, optimizer step.

        Tensor work only, so that acceleration can compile or capture it whole. A function of the
        batch and its accumulation window; returns the detached total loss and terms, on the
        device. Assembled once from the pieces this run has, so no step tests for a feature that
        is off.
        """
        model, loss_fn, loss_terms, optimizer_step = self.model, self.loss_fn, self.loss_terms, self.optimizer_step
        before_forward, before_optimizer_step = self.before_forward, list(self.before_optimizer_step)
        autocast, scaler, optimizer = self.precision.autocast, self.precision.scaler, self.optimizer
        if scaler is not None and before_optimizer_step:
            unscale = scaler.unscale_
            # The hooks (gradient clipping) see true gradients; scaler.step then skips its unscale.
            before_optimizer_step.insert(0, lambda: unscale(optimizer))
        # optimizer.zero_grad() is hidden from Dynamo (torch._disable_dynamo), and through the
        # profiler costs 5 us a call on the tutorial; setting .grad to None is what it does.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        single = self.loss_name
        no_autocast = self.precision.dtype is None
        batch_metrics = self.batch_metrics
        train_metrics = self.config["log"]["train_metrics"] and bool(self.compute_metrics)

        if self.compute_loss or train_metrics:

            def forward(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
                output = model(batch.x)
                terms = loss_terms(batch, output)
                loss = total(terms)
                if train_metrics:
                    with torch.no_grad():
                        terms.update({f"train_{name}": value for name, value in batch_metrics(batch, output).items()})
                return loss, terms

        else:  # no extra terms or metrics: no dict of them to build and sum (1.5 us a tutorial step)

            def forward(batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
                return loss_fn(model(batch.x), batch.y), None

        def step(batch: Batch, window: Window) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            for hook in before_forward:
                batch = hook(batch=batch) or batch
            if no_autocast:
                loss, terms = forward(batch)
            else:
                with autocast():
                    loss, terms = forward(batch)
            if window.first:
                for param in params:
                    param.grad = None
            scaled = loss if window.scale == 1 else loss * window.scale
            if scaler is None:
                scaled.backward()
            else:
                scaler.scale(scaled).backward()
            if window.last:
                for hook in before_optimizer_step:
                    hook()
                if scaler is None:
                    optimizer_step()
                else:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
            detached = loss.detach()
            if terms is None:
                return detached, {single: detached}
            return detached, {name: term.detach() for name, term in terms.items()}

        return step

    def loss_terms(self, batch: Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `[loss]` component's term plus every term `compute_loss` returns."""
        terms = {self.loss_name: self.loss_fn(output, batch.y)}
        for hook in self.compute_loss:
            extra = hook(batch=batch, output=output)
            if extra:
                for name in extra:
                    if name in terms:
                        raise TrainingError(f"hook compute_loss: two loss terms are named {name!r}")
                terms.update(extra)
        return terms

    def batch_metrics(self, batch: Batch, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `compute_metrics` returns for one batch (in a train step or in validation)."""
        values: dict[str, torch.Tensor] = {}
        for hook in self.compute_metrics:
            values.update(hook(batch=batch, output=output) or {})
        return values

    def step_scheduler_after_window(self, scheduler: Any) -> Callable[..., None]:
        def step_scheduler(window: Window, **_: Any) -> None:
            if window.last:  # the optimizer stepped
                scheduler.step()

        return step_scheduler

    @torch.inference_mode()
    def validate(self, batches: Iterable[Batch] | None = None, prefix: str = "val") -> dict[str, float]:
        """Mean loss terms and metrics over the validation data (or `batches`, named with `prefix`:
        the test at the end), with one host-device sync."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in (self.loaders.val() if batches is None else batches) or ():
            for hook in self.before_forward:
                batch = hook(batch=batch) or batch
            with self.precision.autocast():
                output = self.model(batch.x)
                terms = self.loss_terms(batch, output)
            values = {"loss": total(terms), **terms, **self.batch_metrics(batch, output)}
            size = len(batch.y)
            for name, value in values.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * size
            count += size
        self.model.train()
        if not sums:
            return {}
        totals = torch.stack(list(sums.values()))
        if self.world_size > 1:  # every process's sums and count added up: one collective per validation
            totals = torch.cat([totals.double(), totals.new_tensor([count], dtype=torch.float64)])
            dist.all_reduce(totals)
            totals, count = totals[:-1], totals[-1]
        means = (totals / count).double()
        whole: dict[str, torch.Tensor] = {}
        for plugin, after_validation in self.after_validation:
            for name, value in (after_validation() or {}).items():
                if name in sums or name in whole:
                    raise TrainingError(f"plugin {plugin!r}: after_validation: a second metric named {name!r}")
                whole[name] = torch.as_tensor(value, device=means.device).detach().double().reshape(1)
        values = torch.cat([means, *whole.values()]).tolist()  # the host-device sync
        return {f"{prefix}_{name}": value for name, value in zip([*sums, *whole], values)}

    def fit(self) -> Result:
        """Create the run directory (or continue the resumed one) and run the loop. `on_run_end`
        is called whether the run finishes, fails or is interrupted; each of its implementations
        runs even when another failed. SIGINT and SIGTERM end the current step, then the run."""
        error = None
        with self.signals():
            try:
                self.start()
                self.loop()
                if self.state.losses:  # stopped early, between logging points
                    self.log()
                test = self.loaders.test()
                if test is not None:  # once, on the final model (after early stopping restored the best)
                    self.state.test_metrics = self.validate(test, "test")
                    self.check_finite(self.state.test_metrics, self.state.epoch - 1)
            except BaseException as raised:
                error = self.stopped(raised)
            for on_run_end in self.plugins.bind("on_run_end", trainer=self):
                try:
                    on_run_end(error=error)
                except Exception as raised:
                    if error is None:
                        error = self.stopped(raised)
            self.loaders.close()
            if self.distributed is not None:
                self.distributed.close()
        if error is not None:
            raise error
        self.module.eval()
        metrics = {**self.state.metrics, **self.state.test_metrics}
        return Result(self.module, metrics, self.run_dir, self.config, self.state)

    def start(self) -> None:
        """Create the run directory exclusively (or continue the resumed one), then `on_run_start`.
        With several processes, rank 0 creates it and tells the others its name."""
        if self.run_dir is None:
            created = runs.create(self.config["runs_dir"], self.config["run_name"]) if self.rank == 0 else None
            self.run_dir = self.from_rank_zero(created)
        self.hooks.on_run_start(trainer=self)

    def from_rank_zero(self, value: Any) -> Any:
        """Rank 0's `value` on every process (one collective), so that they all decide alike."""
        if self.world_size == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the run to stop after the current step (`Interrupted`); a second
        one exits at once, removing the temporary files being written, so every file stays valid."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set in the main thread
            return

        def handle(number: int, frame: Any) -> None:
            if self.interrupted:
                runs.remove_in_flight()
                os._exit(128 + number)
            self.interrupted = number

        previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def loop(self) -> None:
        """The tutorial's loop: epochs of steps, then the epoch's end."""
        state = self.state
        while state.epoch <= self.epochs and not state.stop:
            # Module.train() walks every submodule (5 µs for Linear(1, 1), a step on the tutorial);
            # only validation or a plugin turns training off, so only then is it worth the walk.
            if not self.model.training:
                self.model.train()
            batches = self.loaders.train(state.epoch, start=state.batch)
            for batch, window in zip(batches, self.windows[state.batch :]):
                state.batch += 1
                state.step += 1
                loss, terms = self.train_step(batch, window)
                state.losses.append((state.epoch, state.step, loss, terms))
                for hook in self.after_step:
                    hook(loss=loss, terms=terms, window=window)
                if self.interrupted and (self.world_size == 1 or (self.rank == 0 and window.last)):
                    # Of several processes, rank 0 stops first, at the end of an accumulation window
                    # (until then each holds its own gradients); the others stop at their next
                    # collective, which it no longer joins (Distributed.failed says why).
                    raise Interrupted(self.interrupted)
            self.end_epoch()

    def end_epoch(self) -> None:
        """Validation and the logging point when due, the epoch scheduler, then on to the next epoch."""
        state = self.state
        epoch = state.epoch
        last = epoch == self.epochs
        if self.has_validation and (last or epoch % self.val_every == 0):
            state.val_metrics, state.val_epoch = self.validate(), epoch
        if last or epoch % self.log_every == 0:
            self.log()
        if self.epoch_scheduler is not None:
            self.epoch_scheduler()
        state.epoch, state.batch = epoch + 1, 0
        for hook in self.epoch_end:
            hook(epoch=epoch)

    def log(self) -> None:
        """A logging point: the step losses since the last one read back with one host-device sync,
        checked finite (naming the term, epoch and step of the first that is not), averaged over
        the current epoch's steps and passed to `on_log` with the last validation's metrics."""
        state = self.state
        rows, state.losses = state.losses, []
        names = ("loss", *rows[0][3]) if rows else ()
        values = [value for *_, loss, terms in rows for value in (loss, *terms.values())]
        lr = self.optimizer.param_groups[0]["lr"]  # the first group's; a tensor under compile and cudagraph
        flat: list[float] = []
        if values:
            stacked = torch.stack(values)  # stack promotes dtypes
            if self.world_size > 1:
                stacked = self.mean_over_processes(stacked, [step for _, step, *_ in rows])
            if isinstance(lr, torch.Tensor):  # read back with the losses, in the same sync
                stacked = torch.cat([stacked.double(), lr.detach().double().reshape(1).to(stacked.device)])
            flat = stacked.tolist()  # host-device sync
            if isinstance(lr, torch.Tensor):
                lr = flat.pop()
        table = [flat[i * len(names) : (i + 1) * len(names)] for i in range(len(rows))]
        for (epoch, step, *_), row in zip(rows, table):
            # The terms before the total ("loss"), so that the message names the term at fault.
            for name, value in [*zip(names[1:], row[1:]), ("loss", row[0])]:
                if not math.isfinite(value):
                    what = f"{name} ({value})" if name.startswith("train_") else f"loss ({value}) in term {name!r}"
                    raise TrainingError(
                        f"non-finite {what} at epoch {epoch}, step {step}; training stopped", located=True
                    )
        self.check_finite(state.val_metrics, state.epoch)
        epoch = rows[-1][0] if rows else state.epoch
        this_epoch = [row for (row_epoch, *_), row in zip(rows, table) if row_epoch == epoch]
        metrics: dict[str, float] = {"epoch": epoch, "step": state.step}
        for column, name in enumerate(names):
            if this_epoch:
                metrics[name] = sum(row[column] for row in this_epoch) / len(this_epoch)
        metrics["lr"] = float(lr)
        metrics.update(state.val_metrics)
        state.metrics = metrics
        self.hooks.on_log(state=state, metrics=metrics, trainer=self)

    @staticmethod
    def check_finite(metrics: Mapping[str, float], epoch: int) -> None:
        for name, value in metrics.items():
            if not math.isfinite(value):
                raise TrainingError(f"non-finite {name} ({value}) at epoch {epoch}; training stopped", located=True)

    def mean_over_processes(self, values: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """The step losses of every process averaged, each weighted by its share of its batch (so
        that an uneven last batch of an epoch counts its samples): one collective per logging point."""
        values = values.double().view(len(steps), -1)
        if self.shares is not None and any(share != 1 for share in self.shares):
            positions = [(step - 1) % self.batches_per_epoch for step in steps]  # a step is a batch
            weights = values.new_tensor([self.shares[position] for position in positions])
            values = values * weights[:, None]
        dist.all_reduce(values)
        return values.flatten() / self.world_size

    def stopped(self, error: BaseException) -> BaseException:
        """The error the run stops with: `error` explained; with several processes, the first error
        any of them met (the one that met it shows it)."""
        explained = self.explain(error)
        return self.distributed.failed(explained) if self.distributed is not None else explained

    def explain(self, error: BaseException) -> BaseException:
        """A TrainingError naming the epoch, the step and, if one raised it, the plugin and hook;
        a ConfigError only while the run's directory does not exist yet."""
        state = self.state
        if isinstance(error, Interrupted):
            error.where(state)
            return error
        if not state.step:
            where = "at the start of the run"
        elif state.batch:
            where = f"epoch {state.epoch}, step {state.step}"
        else:  # between epochs: the state already points at the next one
            where = f"end of epoch {state.epoch - 1}, step {state.step}"
        if self.world_size > 1:
            where = f"rank {self.rank}, {where}"
        if isinstance(error, TrainingError) and not error.located:
            return TrainingError(f"{where}: {error}", located=True)
        # A ConfigError once the run's directory exists is a failure of the run (exit 1): exit 2
        # says that nothing was created.
        own = isinstance(error, ConfigError) and self.run_dir is not None
        if not own and (not isinstance(error, Exception) or isinstance(error, EngineError)):
            return error
        culprit = self.plugins.blame(error.__traceback__)
        if culprit:
            plugin, hook = culprit
            where += f": plugin {plugin!r}" + (f" failed in hook {hook}" if hook else "")
        explained = TrainingError(f"{where}: {error if own else one_line(error)}", located=True)
        explained.__cause__ = error
        return explained


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, *, tensor_lr: bool = False, **changes: Any
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over the same parameter groups, with `changes` applied.

    For `wrap_optimizer` implementations that need other constructor flags (``capturable``,
    ``fused``) or the learning rate as a device tensor (`tensor_lr`: a scheduler then writes it
    in place, which a compiled or captured step follows). The setup chain calls `wrap_optimizer`
    before any state exists, and a resumed run's state is restored into the final optimizer.
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
        if not (isinstance(name, str) and isinstance(number, torch.Tensor) and number.numel() == 1):
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


def build_component(config: Config, plugins: Plugins, kind: str, name: str | None = None, **context: Any) -> Any:
    """The component of `kind` the config names (or `name`, with its default settings), built with
    the context its factory asks for; None for an optional kind with no component chosen."""
    section = config[kind]
    chosen = name or section["name"]
    if chosen is None:
        return None
    component = plugins.component(kind, chosen)
    if chosen == section["name"]:
        arguments = section.component_settings()
    else:
        settings = settings_of(component.factory, f"{kind} {chosen!r}", CORE_KINDS.get(kind, ()))
        arguments = {key: s.default for key, s in settings.items() if s.default is not MISSING}
    try:
        wanted = inspect.signature(component.factory).parameters
    except (TypeError, ValueError):
        wanted = {}
    arguments.update({key: value for key, value in context.items() if key in wanted})
    source = f" (plugin {component.plugin!r})" if component.plugin else ""
    base = REFERENCED_CLASSES.get(kind)
    if inspect.isclass(component.factory) and base is not None and not issubclass(component.factory, base):
        # A class is its own factory: checked before it is called, so that nothing else runs.
        raise ConfigError(f"{kind}.name: {chosen!r} is a class but not a {base.__module__}.{base.__qualname__}")
    try:
        built = component.factory(**arguments)
    except EngineError:
        raise
    except Exception as error:
        raise ConfigError(f"{kind} {chosen!r}{source} cannot be built: {one_line(error)}") from error
    expected = BUILT_TYPES.get(kind)
    if expected is not None and not isinstance(built, expected) and not (built is None and kind in OPTIONAL_KINDS):
        raise ConfigError(
            f"{kind} {chosen!r}{source}: the factory returned a {type(built).__name__}, not a {expected.__name__}"
        )
    return built


# What the factories of the core's kinds must return (data: checked by build_loaders).
BUILT_TYPES: dict[str, type] = {
    "model": torch.nn.Module,
    "loss": Callable,  # type: ignore[dict-item]  # of (output, target)
    "optimizer": torch.optim.Optimizer,
    "precision": Precision,
    "accelerate": Acceleration,
    "scheduler": Scheduled,
}
# What each chained setup hook must return (or None), for the next link and the loop.
CHAINED_TYPES: dict[str, type] = {
    "wrap_model": torch.nn.Module,
    "wrap_optimizer": torch.optim.Optimizer,
    "wrap_step": Callable,  # type: ignore[dict-item]
}
# What a class given as a component (``"package.module:Class"``) must derive from.
REFERENCED_CLASSES: dict[str, type] = {**BUILT_TYPES, "data": torch.utils.data.Dataset, "loss": torch.nn.Module}


def record_inferred(config: Config, info: DataInfo) -> Config:
    """The config with `[inferred]` filled from the data (so that config.toml rebuilds the model
    without the data); a value the config already sets must match the data."""
    inferred = {"n_features": info.n_features, "n_outputs": info.n_outputs, "task": info.task}
    for key, value in inferred.items():
        given = config["inferred"][key]
        if given not in (0, "") and given != value:
            raise ConfigError(f"inferred.{key}: the job was written for {given!r}, but the data has {value!r}")
    return config.replace("inferred", inferred)


def setup(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    resume: str | Path | None = None,
    imports: bool = True,
) -> Trainer:
    """A Trainer ready to `fit`, with a fresh plugin manager: the setup chain has run, nothing is written.

    Its first link, the ``distributed`` component, joins the processes of a data-parallel run (under
    torchrun); when a later link fails, the processes learn it and leave their group.

    Whatever fails here is a ConfigError naming what is at fault. `resume` continues a run: a run
    directory continues from its latest checkpoint (its config.toml is the job unless one is
    given); "auto", like the config's ``resume = "auto"``, continues the run named by ``run_name``
    when it has a checkpoint and starts it otherwise. `imports` False refuses a job that imports
    code (`load_config`).
    """
    run_dir = None
    if resume not in (None, "", "auto"):
        run_dir = Path(resume)
        if not (run_dir / runs.CONFIG).is_file():
            raise ConfigError(f"--resume: '{run_dir}' is not a run directory (it has no {runs.CONFIG})")
        job = run_dir / runs.CONFIG if job is None else job
    config, found = load_config(job, overrides, plugins, blocked, imports=imports)
    if run_dir is None and (resume == "auto" or config["resume"] == "auto"):
        if not config["run_name"]:
            raise ConfigError("resume = 'auto': name the run to continue with run_name")
        existing = Path(config["runs_dir"]) / config["run_name"]
        run_dir = existing if existing.is_dir() else None
    elif run_dir is None:
        runs.check_free(config["runs_dir"], config["run_name"])  # `fit` creates it exclusively
    checkpoint = runs.latest_checkpoint(run_dir) if run_dir is not None else None
    if checkpoint is None and resume not in (None, "", "auto"):
        raise ConfigError(f"--resume: run '{run_dir}' has no checkpoint to continue from")
    # The first link of the setup chain: joins the processes of a data-parallel run (None: one).
    distributed: Distributed | None = build_component(
        config, found, "distributed", device=resolve_device(config["device"])
    )
    if distributed is None:
        return Trainer(config, found, run_dir=run_dir, checkpoint=checkpoint)
    try:
        return Trainer(config, found, run_dir=run_dir, checkpoint=checkpoint, distributed=distributed)
    except BaseException as error:
        stopped = distributed.failed(error)  # another process's error, if it came first
        distributed.close()
        if stopped is error:
            raise
        raise stopped from error


def run(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    resume: str | Path | None = None,
    imports: bool = True,
) -> Result:
    """Train the job and return the model (in eval mode) and final metrics.

    `job` is a dict shaped like the TOML file, a path to one, a Config, or None for the default
    job. `plugins` are extra plugin objects or module names; `blocked` names plugins to skip;
    `resume` and `imports` are as for `setup`.
    """
    trainer = setup(job, overrides=overrides, plugins=plugins, blocked=blocked, resume=resume, imports=imports)
    try:
        return trainer.fit()
    finally:
        if trainer.world_size > 1:  # its DDP module and gloo group, freed now (see engine.cli.release_process_group)
            del trainer
            gc.collect()


def load(run_dir: str | Path, which: Literal["final", "best", "last"] = "final") -> torch.nn.Module:
    """The model a run trained, on the CPU in eval mode, rebuilt from the run's config.toml (which
    records what was inferred from the data) and its weights: ``final`` (model.pt, a completed or
    interrupted run), ``best`` (by the checkpoints' monitored metric) or ``last`` (the latest
    checkpoint). It takes raw input features: a run that standardized its inputs gets its
    `Standardize` in front. Nothing in the files is executed."""
    config, plugins, info = open_run(Path(run_dir))
    return trained_module(config, plugins, info, *runs.model_file(Path(run_dir), which))


def open_run(
    run_dir: Path, plugins: Iterable[Any] = (), blocked: Iterable[str] = ()
) -> tuple[Config, Plugins, DataInfo]:
    """A finished run's config.toml (with `plugins` and without `blocked`) and what the run
    inferred from its data, or a ConfigError saying why the directory holds no trained run."""
    if not (run_dir / runs.CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (it has no {runs.CONFIG})")
    config, found = load_config(run_dir / runs.CONFIG, plugins=plugins, blocked=blocked)
    inferred = config["inferred"]
    if not inferred["task"]:
        raise ConfigError(f"'{run_dir / runs.CONFIG}' records no [inferred] sizes: the run never started")
    info = DataInfo(inferred["n_features"], inferred["n_outputs"], inferred["task"], n_train=0)
    data = config["data"]
    if "threshold" in data:  # the batching plugin's setting of a binary run, for predict and evaluate
        info = replace(info, threshold=data["threshold"])
    return config, found, info


def trained_module(config: Config, plugins: Plugins, info: DataInfo, path: Path, expected: str) -> torch.nn.Module:
    """The run's model rebuilt on the CPU in eval mode with the weights of the file `path` (of
    format `expected`), behind its `Standardize` if the run standardized its inputs."""
    module = build_component(config, plugins, "model", info=info, device=torch.device("cpu"))
    saved = runs.load(path, expected)
    module.load_state_dict(saved["model"])
    if saved.get("standardize") is not None:  # the inputs were standardized in training: so here
        module = torch.nn.Sequential(Standardize(**saved["standardize"]), module)
    return module.eval()
