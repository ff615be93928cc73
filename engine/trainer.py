"""The trainer: a run's setup (engine/chain.py), its loop, validation and logging points, its end.
`engine.setup` and `engine.run` build one (engine/start.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import resuming, runs
from .chain import build_chain, chain, resolve_device
from .checks import check_finite, check_finite_row, check_sample, explain, in_eval_mode, setup_error, whole_set_metrics
from .components import build_component
from .config import Config
from .errors import ConfigError, Interrupted, TrainingError, one_line
from .plugins import Plugins
from .schema import dump_toml
from .step import batch_metrics, loss_terms, total
from .steps import INFINITE
from .types import Batch, Distributed, OneProcess, State


@dataclass(slots=True)
class Result:
    """What `run` returns: the model the run ended with, the final metrics and where its files are."""

    model: torch.nn.Module
    metrics: dict[str, float]
    run_dir: Path
    config: Config
    state: State


class Trainer:
    """One run: its config, plugins, components and state (the public part: `engine.TrainerView`).
    Built by `setup`, run by `fit`.

    The constructor is the setup chain after its first link, `distributed` (`setup` joins the
    processes of the run, if any, and hands them over): it builds every component, lets the
    chained hooks wrap them, restores `checkpoint` into the result and checks a sample of the data,
    but writes nothing; `fit` creates the run directory (or continues `run_dir`) and runs the loop.
    """

    def __init__(
        self,
        config: Config,
        plugins: Plugins,
        *,
        run_dir: Path | None = None,
        checkpoint: Path | None = None,
        distributed: Distributed | None = None,
        allow_changes: Iterable[str] = (),
    ) -> None:
        self.config, self.plugins, self.hooks = config, plugins, plugins.hook
        self.distributed = distributed if distributed is not None else OneProcess(resolve_device(config["device"]))
        self.run_dir = run_dir  # created when the run starts, unless it continues one
        self.resumed_from: Path | None = None
        self.final_module: torch.nn.Module | None = None
        self.interrupted = 0  # the number of the signal that asked the run to stop
        self.started, self.started_at = 0.0, ""
        # What resumes changed of the run's settings, and what this one may change beyond the
        # changeable ones (engine/resuming.py).
        self.changes: list[dict[str, Any]] = []
        self.allowed_changes = tuple(allow_changes)
        self.lock: runs.Lock | None = None
        try:
            if run_dir is not None and self.rank == 0:  # before its checkpoint is read
                self.lock = runs.Lock(run_dir)
            build_chain(self, self.distributed.broadcast(checkpoint))  # the checkpoint rank 0 found
            check_sample(self)
        except BaseException as error:
            self.release()
            if isinstance(error, ConfigError) or not isinstance(error, Exception):
                raise
            raise setup_error(plugins, error) from error  # nothing is written yet: it is the setup's

    @property
    def rank(self) -> int:
        return self.distributed.rank

    @property
    def world_size(self) -> int:
        return self.distributed.world_size

    def build(self, kind: str, name: str | None = None, **context: Any) -> Any:
        """Build the component of `kind` the config names (or `name`, with its default settings),
        passing the context it asks for. An optional kind with no component chosen builds None."""
        return build_component(self.config, self.plugins, kind, name, **context)

    def final_model(self, ending: bool = False) -> torch.nn.Module:
        """The `final_model` chain on the weights as they are now."""
        return chain(self, "final_model", "module", self.module, ending=ending)

    def elapsed(self) -> float:
        """Seconds of training so far, across the resumes of the run."""
        return self.state.seconds + (time.perf_counter() - self.started if self.started else 0.0)

    # --- the run ----------------------------------------------------------------------------

    def fit(self) -> Result:
        """Create the run directory (or continue the resumed one), run the loop and end the run:
        the final model, the test, `model.pt`, `on_run_end` (whether the run finished, failed or
        was interrupted) and the summary. SIGINT and SIGTERM end the current window, then the run."""
        error = None
        with self.signals():
            try:
                self.start()
                self.loop()
                self.finish(completed=True)
            except BaseException as raised:
                error = self.stopped(raised)
            if isinstance(error, Interrupted) and self.run_dir is not None:
                try:
                    self.finish(completed=False)
                except Exception as raised:
                    error = self.stopped(raised)
            error = self.end(error)
        if error is not None:
            raise error
        metrics = {**self.state.metrics, **self.state.test_metrics}
        return Result(self.final_module.eval(), metrics, self.run_dir, self.config, self.state)

    def start(self) -> None:
        """Create the run directory exclusively (or continue the resumed one), claim it, then
        `on_run_start`. Rank 0 writes, and tells the others the name."""
        created = self.run_dir is None
        if created:
            made = runs.create(self.config["runs_dir"], self.config["run_name"]) if self.rank == 0 else None
            self.run_dir = self.distributed.broadcast(made)
        self.started, self.started_at = time.perf_counter(), now()
        if self.rank == 0:
            self.claim(created)
        self.hooks.on_run_start(trainer=self)

    def claim(self, created: bool) -> None:
        """Rank 0's hold on the run directory: its lock (a resumed run's is taken at setup), the
        space kept for the final summary, config.toml and the "running" summary. A new directory
        that cannot get that far is removed: it holds nothing, and its name stays free."""
        try:
            self.lock = self.lock or runs.Lock(self.run_dir)
            runs.reserve(self.run_dir)
            runs.write_text(self.run_dir / runs.CONFIG, dump_toml(self.config))
            runs.write_json(self.run_dir / runs.SUMMARY, self.summary())
        except BaseException as error:
            if created:
                self.release()
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.started_at = ""  # no summary for a directory that is gone
            if isinstance(error, OSError):
                raise TrainingError(f"cannot start the run in '{self.run_dir}': {one_line(error)}") from None
            raise

    def loop(self) -> None:
        """The tutorial's loop: epochs of steps, each epoch then ended (`end_epoch`); the points
        counted in steps that fall within an epoch end there (`end_interval`)."""
        state = self.state
        while state.step < self.last_step and not state.stop:
            # Module.train() walks every submodule (5 us for Linear(1, 1), a step of the tutorial:
            # bench loop-overhead:tutorial:cpu); only validation turns training off.
            if not self.model.training:
                self.model.train()
            batches = self.loaders.train(state.epoch, start=state.batch)
            for batch, window in zip(batches, self.clock.windows_from(state.batch)):
                state.batch += 1
                state.step += 1
                loss, terms = self.train_step(batch, window)
                state.losses.append((state.epoch, state.step, loss, terms))
                for hook in self.after_step:
                    hook(loss=loss, terms=terms, window=window)
                if state.step == self.due and state.batch != self.batches_per_epoch and self.end_interval():
                    break  # the run ends within the epoch
                self.stop_if_asked(window.last)
            else:
                self.end_epoch()
                self.stop_if_asked(True)  # a signal during validation: the epoch's end is a window's

    def stop_if_asked(self, window_ended: bool) -> None:
        """After SIGINT or SIGTERM, `Interrupted` at the end of a window (within one the gradients
        are half summed), where the processes agree to stop (engine.Distributed.stops)."""
        if self.interrupted and window_ended and self.distributed.stops(self.state.step):
            raise Interrupted(self.interrupted)

    def end_epoch(self) -> None:
        """Validation and the logging point when due, the epoch scheduler, then on to the next epoch."""
        state = self.state
        epoch = state.epoch
        self.measure(epoch)
        if self.epoch_scheduler is not None:
            self.epoch_scheduler()
        state.epoch, state.batch = epoch + 1, 0
        for hook in self.epoch_end:
            hook(epoch=epoch)

    def end_interval(self) -> bool:
        """A point counted in steps within an epoch (`due`): validation and the logging point when
        due, then `on_interval_end`; True when the run ends here (its last step, or a stop)."""
        self.measure()
        for hook in self.interval_end:
            hook(step=self.state.step)
        return self.state.stop or self.state.step == self.last_step

    def measure(self, epoch: int = 0) -> None:
        """Validation, then the logging point, when due now: by epochs at the end of `epoch`, by
        steps at a point counted in steps, and both at the run's last step."""
        state, step = self.state, self.state.step
        validate = step == self.last_step or (bool(epoch and self.val_every) and epoch % self.val_every == 0)
        log = step == self.last_step or (bool(epoch and self.log_every) and epoch % self.log_every == 0)
        if step == self.due:
            validate, log = validate or step == self.next_val, log or step == self.next_log
            self.plan()
        if validate and self.has_validation:
            state.val_metrics, state.val_step = self.validate(), step
        if log:
            self.log()

    def plan(self) -> None:
        """The points counted in steps after the current step: the next validation, logging point
        and the run's last step, as train steps (engine/steps.py); `due` is the first of them."""
        step = self.state.step
        self.next_val = self.clock.next(self.val_every_steps, step) if self.has_validation else INFINITE
        self.next_log = self.clock.next(self.log_every_steps, step)
        self.due = min(self.next_val, self.next_log, self.last_step)

    def finish(self, completed: bool) -> None:
        """The end of training: the losses not yet logged (a run stopped early), the final model,
        the test on it (a completed run), and `model.pt`."""
        if completed and self.state.losses:
            self.log()
        self.final_module = self.final_model(ending=True)
        test = self.loaders.test() if completed else None
        if test is not None:  # once, on the model the run ended with
            self.state.test_metrics = self.validate(test, "test", self.final_module)
            check_finite(self.state.test_metrics, self.state.epoch - 1)
        weights = self.distributed.full_weights(self.final_module)  # every process: a gather when sharded
        if self.rank == 0:
            saved = {"format": runs.MODEL_FORMAT, "model": weights, "step": self.state.step}
            runs.save(saved, self.run_dir / runs.MODEL)

    def end(self, error: BaseException | None) -> BaseException | None:
        """`on_run_end` (every implementation, even when one raised), the summary, and the release
        of the loaders and processes; the error the run ends with."""
        for on_run_end in self.plugins.bind("on_run_end", trainer=self):
            try:
                on_run_end(error=error)
            except Exception as raised:
                if error is None:
                    error = self.stopped(raised)
        if self.run_dir is not None and self.rank == 0 and self.started_at:
            runs.unreserve(self.run_dir)  # the space kept for this write, on a disk the run may have filled
            try:
                runs.write_json(self.run_dir / runs.SUMMARY, self.summary(error, ended=True))
            except OSError as raised:
                error = error or TrainingError(f"cannot write {self.run_dir / runs.SUMMARY}: {one_line(raised)}")
        self.loaders.close()
        self.distributed.close()
        self.release()
        return error

    def release(self) -> None:
        """Let the run directory go: its lock, for the next process to train it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def summary(self, error: BaseException | None = None, ended: bool = False) -> dict[str, Any]:
        """summary.json, its one schema: "running" with the process, then how the run ended."""
        values: dict[str, Any] = {
            "status": "running",
            "run_name": self.run_dir.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started_at,
        }
        if self.resumed_from is not None:
            values["resumed_from"] = str(self.resumed_from.relative_to(self.run_dir))
        if self.changes:  # what resumes changed, each at the step it resumed from
            values["changes"] = self.changes
        if not ended:
            return values
        state, wall = self.state, self.elapsed()
        status = "interrupted" if isinstance(error, Interrupted) else "failed"
        if error is None:  # a plugin that stopped the run may name how it ended (State.stop_status)
            status = state.stop_status if state.stop and state.stop_status else "completed"
        values.update(status=status, ended=now(), epochs_completed=state.epoch - 1, steps=state.step)
        values.update(wall_time_s=round(wall, 4), steps_per_s=round(state.step / wall, 2) if wall > 0 else None)
        values["train_loss"] = state.metrics.get("loss")
        values.update({name: value for name, value in state.metrics.items() if name.startswith("val_")})
        values.update(state.test_metrics)
        if error is not None:
            values["error"] = str(error) or type(error).__name__
        return values

    # --- validation, logging points, checkpoints --------------------------------------------------

    @torch.inference_mode()
    def validate(
        self, batches: Iterable[Batch] | None = None, prefix: str = "val", model: torch.nn.Module | None = None
    ) -> dict[str, float]:
        """Mean loss terms and metrics over the validation data (or `batches`, named with `prefix`,
        on `model`: the test at the end), with one host-device sync."""
        model = model if model is not None else self.model
        sums: dict[str, torch.Tensor] = {}
        count = 0
        with in_eval_mode(self.model, model):
            for batch in (self.loaders.val() if batches is None else batches) or ():
                for hook in self.before_forward:
                    batch = hook(batch=batch) or batch
                with self.precision.autocast():
                    output, returned = self.call(model, batch)
                    terms = loss_terms(self, batch, output, returned)
                values = {"loss": total(terms), **terms, **batch_metrics(self, batch, output)}
                size = len(batch.y)
                for name, value in values.items():
                    sums[name] = sums.get(name, 0) + value.detach().float() * size
                count += size
            whole = whole_set_metrics(self, sums) if sums else {}
        if not sums:
            return {}
        # Every process's sums and count added up: one collective per validation.
        totals = torch.stack([*sums.values(), torch.tensor(float(count), device=self.device)]).double()
        totals = self.distributed.all_reduce(totals)
        means = totals[:-1] / totals[-1]
        flat = [value.to(means.device).double().reshape(1) for value in whole.values()]
        values = torch.cat([means, *flat]).tolist()  # the host-device sync
        return {f"{prefix}_{name}": value for name, value in zip([*sums, *whole], values)}

    def log(self) -> None:
        """A logging point: the step losses since the last one read back with one host-device sync,
        checked finite (naming the term, epoch and step of the first that is not), averaged over
        them (in a run counted in epochs, over the current epoch's) and passed to `on_log` with
        the last validation's metrics."""
        state = self.state
        rows, state.losses = state.losses, []
        names = ("loss", *rows[0][3]) if rows else ()
        lr = self.optimizer.param_groups[0]["lr"]  # the first group's; a tensor under compile and cudagraph
        table: list[list[float]] = []
        if rows:
            stacked = torch.stack([value for *_, loss, terms in rows for value in (loss, *terms.values())])
            values = self.reduced(stacked, [step for _, step, *_ in rows])
            if isinstance(lr, torch.Tensor):  # read back with the losses, in the same sync
                values = torch.cat([values, lr.detach().double().reshape(1).to(values.device)])
            flat = values.tolist()  # host-device sync
            lr = flat.pop() if isinstance(lr, torch.Tensor) else lr
            table = [flat[i * len(names) : (i + 1) * len(names)] for i in range(len(rows))]
        for (epoch, step, *_), row in zip(rows, table):
            check_finite_row(names, row, epoch, step)
        check_finite(state.val_metrics, state.epoch)
        epoch = rows[-1][0] if rows else state.epoch
        by_epochs = self.max_steps is None
        averaged = [row for (row_epoch, *_), row in zip(rows, table) if row_epoch == epoch or not by_epochs]
        metrics: dict[str, float] = {"epoch": epoch, "step": state.step}
        if averaged:
            metrics.update({name: sum(row[i] for row in averaged) / len(averaged) for i, name in enumerate(names)})
        metrics["lr"] = float(lr)
        metrics.update(state.val_metrics)
        state.metrics = metrics
        self.hooks.on_log(state=state, metrics=metrics, trainer=self)

    def reduced(self, values: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """The step losses (a row of `values` per step in `steps`) averaged over the processes, each
        weighted by its share of its batch, so that an uneven last batch of an epoch counts its
        samples: one collective per logging point."""
        values = values.double().view(len(steps), -1)
        weights = values.new_tensor([self.shares[(step - 1) % len(self.shares)] for step in steps])
        return (self.distributed.all_reduce(values * weights[:, None]) / self.world_size).flatten()

    def checkpoint(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (it loads with
        weights_only=True): the model, optimizer, scheduler, gradient scaler, the loop state with
        every RNG, the state the plugins return from `save_plugin_state`, and the model validation
        evaluates when it is not the trained one (`final_model`: an average), which
        ``which = "best" | "last"`` opens; the model and the optimizer as
        `engine.Distributed.state` gives them (when sharded, this process's shards: every process
        takes the checkpoint). Taken at the end of an accumulation window (within one the gradients
        are half summed) or of an epoch."""
        state, scaler = self.state, self.precision.scaler
        if state.batch and not self.clock.period[(state.batch - 1) % len(self.clock.period)].last:
            raise TrainingError("a checkpoint is taken at the end of an accumulation window, not inside one")
        saved = state.state_dict()
        saved["seconds"] = self.elapsed()
        evaluated = self.final_model()  # the model validation evaluates (an average), if not the trained one
        return {
            "format": runs.CHECKPOINT_FORMAT,
            **self.distributed.state(self.module, self.optimizer),  # "model" and "optimizer"
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": saved,
            "evaluated": evaluated.state_dict() if evaluated is not self.module else None,
            "plugins": self.plugin_state(),
            "course": resuming.course(self),
        }

    def plugin_state(self) -> dict[str, Any]:
        """What every `save_plugin_state` returns, merged; a key returned twice is an error."""
        merged: dict[str, Any] = {}
        for returned_state in self.hooks.save_plugin_state(trainer=self):
            if not isinstance(returned_state, Mapping):
                raise TrainingError(f"hook save_plugin_state returned a {type(returned_state).__name__}, not a dict")
            for key, value in returned_state.items():
                if key in merged:
                    raise TrainingError(f"hook save_plugin_state: two plugins return the state {key!r}")
                merged[key] = value
        return merged

    # --- signals and errors -------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the run to stop at the end of the current window (`Interrupted`);
        a second one exits at once, removing the temporary files being written, so every file
        stays valid."""
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

    def stopped(self, error: BaseException) -> BaseException:
        """The error the run stops with: `error` explained; with several processes, the first error
        any of them met (the one that met it shows it)."""
        return self.distributed.failed(explain(self, error))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
