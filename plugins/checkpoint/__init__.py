"""``[checkpoint]``: when the run takes checkpoints, how many it keeps and its best ones; it owns
the run's ``checkpoints/`` folder, says which checkpoint a resume or ``which = "best" | "last"``
means (`find_checkpoint`) and reads it (`read_checkpoint`).

A checkpoint is `trainer.checkpoint()` (the model, optimizer, scheduler, gradient scaler, the
loop state with every RNG and the unlogged losses, and every plugin's `save_plugin_state`)
written atomically to ``checkpoints/step-<step>.pt``, or, when the model is sharded (FSDP2), to
the directory ``checkpoints/step-<step>.dcp/`` (plugins/checkpoint/sharded.py). The triggers are
independent; any one that is set fires, at the end of an accumulation window (within one the
gradients are half summed) or of an epoch:

- ``every_steps``: every N train steps (batches); ``every_epochs``: at the end of every N-th epoch;
- ``every_seconds`` (default 60): once that long has passed since the last checkpoint, checked
  after each step and at each epoch's end;
- the end of the run, and an interruption (SIGINT, SIGTERM), always; a failed run keeps the
  checkpoints it had (its last state may be what failed).

Of a run's processes, rank 0 alone takes and writes checkpoints of a whole model: the weights,
optimizer state and data position are every process's (the position counts global batches, so a
run resumes with another number of processes as well). A sharded model's checkpoint is taken by
every process at the same step, each writing its shards, and resumes with any number of
processes too. Its time trigger is rank 0's clock: rank 0 tells the others the step it falls at,
estimated from the pace of the steps so far, at a few steps after each checkpoint (1, 2, 4, 8...
steps later: one broadcast each), so that no step waits for a collective of its own.

The training thread takes the checkpoint (a copy of every tensor, on the CPU: a few hundred
microseconds for the MLP job) and, with ``async_save`` (the default), a background thread writes
it, so the loop does not wait for the disk; a checkpoint waits for the previous one to be written,
and the run's end waits for the last (an error writing one ends the run there). ``async_save =
false`` writes it on the training thread. (The key is not ``async``: a Python keyword cannot name
a setting.)

``keep_last`` step checkpoints are kept. With ``keep_best`` > 0, an epoch's end or a point counted
in steps (``val_every_steps``, ``log.every_steps``) whose ``monitor`` (a validation metric like
``val_loss``, or a logged one like ``loss``) beats the kept ones by ``mode`` is also linked as
``checkpoints/best-<step>.pt`` (``.dcp``), ranked in ``checkpoints/best.json``. A run that
continues a directory (resumed, or restarted by ``resume = "auto"``) removes what its killed
predecessor wrote after the checkpoint it starts from (later checkpoints, a half-written one):
they belong to a future that is run again.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import engine

from . import sharded
from .files import (
    FOLDER,
    RANKING,
    SHARDED,
    WHOLE,
    best_checkpoint,
    checkpoint_path,
    link,
    numbered,
    own_name,
    remove,
    replace_directory,
    snapshot,
    temporary_path,
)

__all__ = ["Checkpoints", "Settings", "best_checkpoint", "checkpoint_path", "numbered"]
runs = engine.runs


@dataclass(frozen=True)
class Settings:
    # When checkpoints are taken and how many are kept: a resumed run may change them.
    every_steps: Annotated[int, engine.Range(ge=0), engine.Changeable()] = 0  # 0: off
    every_epochs: Annotated[int, engine.Range(ge=0), engine.Changeable()] = 0  # 0: off
    every_seconds: Annotated[float, engine.Range(ge=0), engine.Changeable()] = 60.0  # 0: off
    keep_last: Annotated[int, engine.Range(ge=1), engine.Changeable()] = 2
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    keep_best: Annotated[int, engine.Range(ge=0)] = 1  # 0: no best tracking
    async_save: Annotated[bool, engine.Changeable()] = (
        True  # written by a background thread (a sharded one: dcp.async_save)
    )


class Checkpoints:
    def __init__(self) -> None:
        self.settings: Any = None
        # The settings read per step, kept as attributes (a Section lookup costs 0.2 us).
        self.every_steps = self.every_epochs = self.keep_best = 0
        self.monitor = ""
        self.due = math.inf  # the monotonic time the time trigger fires at
        self.saved: tuple[int, int, int] | None = None  # the (epoch, batch, step) last saved
        self.waiting = False  # a step trigger fired inside an accumulation window
        self.best: list[dict[str, Any]] = []  # the kept best checkpoints, best first: step, value, file
        self.writer: ThreadPoolExecutor | None = None
        self.writing: Future[Any] | None = None
        # A sharded model: every process takes the checkpoints, and the time trigger falls at the
        # step `due_step`, agreed at the steps `since` + 1, 2, 4, ... (time, step: the last rearm).
        self.sharded = False
        self.due_step = math.inf
        self.since = (0.0, 0)
        self.group: Any = None  # the gloo group of a sharded checkpoint's collectives

    @engine.hookimpl
    def register_settings(self):
        return {"checkpoint": Settings}

    @engine.hookimpl
    def find_checkpoint(self, run_dir: Path, which: str) -> Path | None:
        if which == "best":
            return best_checkpoint(run_dir)
        found = numbered(run_dir, "step")
        return found[-1][1] if found else None

    @engine.hookimpl
    def read_checkpoint(self, path: Path, template: dict[str, Any]) -> dict[str, Any] | None:
        return sharded.read(path, template) if path.suffix == SHARDED else None

    @engine.hookimpl
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        self.sharded = trainer.distributed.sharded
        if trainer.rank and not self.sharded:
            return  # no trigger is armed: rank 0 writes the checkpoints of a whole model
        self.settings = trainer.config["checkpoint"]
        self.every_steps, self.every_epochs = self.settings["every_steps"], self.settings["every_epochs"]
        self.keep_best, self.monitor = self.settings["keep_best"], self.settings["monitor"]
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        if self.sharded:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # every process: a collective
        self.rearm(trainer.state.step)
        if trainer.rank == 0:
            fresh = not (trainer.run_dir / FOLDER).exists()
            engine.runs.folder(trainer.run_dir, FOLDER)  # a real folder: pruning must not delete through a link
            self.forget_after(trainer, trainer.state.step, fresh)  # a directory reused by a resumed or restarted run

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return trainer.rank != 0 and not trainer.distributed.sharded

    # Last in the step's and the epoch's hooks: a checkpoint holds the state every other plugin
    # updated there (an average after its step, early stopping's count and its stop).
    @engine.hookimpl(trylast=True)
    def after_step(self, state: engine.State, window: engine.Window, trainer: engine.TrainerView) -> None:
        if (self.every_steps and state.step % self.every_steps == 0) or self.time_is_up(state, trainer) or self.waiting:
            if window.last:
                self.save(trainer)
            else:
                self.waiting = True

    @engine.hookimpl(trylast=True)
    def on_epoch_end(self, epoch: int, state: engine.State, trainer: engine.TrainerView) -> None:
        improved = self.improved(state) if self.keep_best else None
        due = state.step >= self.due_step if self.sharded else time.monotonic() >= self.due
        if (
            improved is not None
            or (self.every_epochs and epoch % self.every_epochs == 0)
            or due
            or state.step == trainer.length.batches
            or state.stop
        ):
            self.save(trainer, best=improved)

    @engine.hookimpl
    def on_interval_end(self, state: engine.State, trainer: engine.TrainerView) -> None:
        """A point counted in steps, at the end of a window: the best so far by a validation here."""
        improved = self.improved(state) if self.keep_best else None
        if improved is not None or state.stop:
            self.save(trainer, best=improved)

    @engine.hookimpl(tryfirst=True)  # the weights first: other plugins' failures at the end must not cost them
    def on_run_end(self, trainer: engine.TrainerView, error: BaseException | None) -> None:
        if self.writer is None:
            return  # the run never started
        try:
            state = trainer.state
            ended = error is None or isinstance(error, engine.Interrupted)
            if ended and self.saved != (state.epoch, state.batch, state.step):
                self.save(trainer)
            self.wait()
        finally:
            self.writer.shutdown(wait=True)

    @engine.hookimpl
    def save_plugin_state(self) -> dict[str, Any]:
        return {"checkpoint": {"best": [dict(entry) for entry in self.best]}}

    @engine.hookimpl
    def load_plugin_state(self, state: dict[str, Any], trainer: engine.TrainerView) -> None:
        if "checkpoint" in state:
            self.best = [dict(entry) for entry in state["checkpoint"]["best"]]
            for entry in self.best:
                own_name(entry.get("file"), trainer.resumed_from)

    def improved(self, state: engine.State) -> float | None:
        """The monitored value measured at this step if it ranks among the best kept, else None."""
        value = state.monitored(self.monitor, "checkpoint.monitor")
        if value is None:
            return None
        if len(self.best) < self.keep_best:
            return value
        worst = self.best[-1]["value"]
        return value if (value < worst if self.settings["mode"] == "min" else value > worst) else None

    def time_is_up(self, state: engine.State, trainer: engine.TrainerView) -> bool:
        if not self.sharded:
            return time.monotonic() >= self.due
        since = state.step - self.since[1]
        if since & (since - 1) == 0 and self.due < math.inf:  # 1, 2, 4, ... steps after the last rearm
            self.due_step = trainer.distributed.broadcast(self.due_step_estimate(state.step))
        return state.step >= self.due_step

    def due_step_estimate(self, step: int) -> float:
        """Rank 0's estimate of the step at which `every_seconds` will have passed, at the pace of
        the steps since the last rearm (only rank 0's clock counts)."""
        now, (started, first) = time.monotonic(), self.since
        if now >= self.due:
            return step
        pace = (now - started) / max(step - first, 1)
        return step + math.ceil((self.due - now) / pace) if pace > 0 else math.inf

    def save(self, trainer: engine.TrainerView, best: float | None = None) -> None:
        """Take a checkpoint now; write it (and rank it, and prune the old ones) in the background.
        The folder was checked to be the run's own at the start; the writer keeps to it."""
        state, run_dir = trainer.state, trainer.run_dir
        path = checkpoint_path(run_dir, "step", state.step, SHARDED if self.sharded else WHOLE)
        ranking = None
        if best is not None:  # ranked before the checkpoint is taken: its own state includes the rank
            name = checkpoint_path(run_dir, "best", state.step, path.suffix).name
            self.best.append({"step": state.step, "value": best, "file": name})
            self.best.sort(key=lambda entry: entry["value"], reverse=self.settings["mode"] == "max")
            self.best, dropped = self.best[: self.settings["keep_best"]], self.best[self.settings["keep_best"] :]
            ranking = ([dict(entry) for entry in self.best], [entry["file"] for entry in dropped], name)
        taken = trainer.checkpoint()
        self.saved, self.waiting = (state.epoch, state.batch, state.step), False
        self.wait()
        in_background = self.settings["async_save"]
        if self.sharded:
            self.writing = self.write_sharded(trainer, taken, path, ranking, in_background)
        elif in_background:
            self.writing = self.writer.submit(self.write, snapshot(taken), run_dir, path, ranking)
        else:
            self.write(taken, run_dir, path, ranking)
        self.rearm(state.step)

    def write(self, taken: dict[str, Any], run_dir: Path, path: Path, ranking: Any) -> None:
        runs.save(taken, path)
        self.written(run_dir, path, ranking)

    def write_sharded(
        self, trainer: engine.TrainerView, taken: dict[str, Any], path: Path, ranking: Any, in_background: bool
    ) -> Future[Any]:
        """Every process writes its shards; rank 0 then the rest beside them, and renames the
        directory once it is whole (plugins/checkpoint/sharded.py)."""
        temporary = temporary_path(path)
        shards = sharded.start(taken, temporary, self.group, in_background)
        if trainer.rank:
            return shards
        beside = snapshot(taken)
        if in_background:
            return self.writer.submit(self.finish_sharded, shards, beside, trainer.run_dir, path, ranking)
        self.finish_sharded(shards, beside, trainer.run_dir, path, ranking)
        return shards

    def finish_sharded(
        self, shards: Future[Any], beside: dict[str, Any], run_dir: Path, path: Path, ranking: Any
    ) -> None:
        shards.result()  # every process's shards and the metadata are on disk
        temporary = temporary_path(path)
        runs.save(beside, temporary / sharded.STATE)
        replace_directory(temporary, path)
        self.written(run_dir, path, ranking)

    def written(self, run_dir: Path, path: Path, ranking: Any) -> None:
        """After a whole checkpoint: link and rank it if it is among the best, prune the old ones."""
        if ranking is not None:
            kept, dropped, name = ranking
            link(path, run_dir / FOLDER / name)
            self.write_ranking(run_dir, kept)
            for name in dropped:
                remove(run_dir / FOLDER / name)
        for _, old in numbered(run_dir, "step")[: -self.settings["keep_last"]]:
            remove(old)

    def wait(self) -> None:
        """Until the checkpoint being written is on disk; its error, if writing it failed."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            try:
                writing.result()
            except Exception as error:
                raise engine.TrainingError(f"cannot write a checkpoint: {engine.one_line(error)}") from None

    def write_ranking(self, run_dir: Path, ranking: list[dict[str, Any]]) -> None:
        index = {"monitor": self.settings["monitor"], "mode": self.settings["mode"], "ranking": ranking}
        runs.write_text(run_dir / FOLDER / RANKING, json.dumps(index, indent=2) + "\n")

    def forget_after(self, trainer: engine.TrainerView, step: int, fresh: bool) -> None:
        """Remove what a killed run left after `step` (its later checkpoints, a half-written one)
        and rank only the best checkpoints that exist; in a `fresh` folder, there is none."""
        for stray in [*trainer.run_dir.glob(".*.tmp"), *(trainer.run_dir / FOLDER).glob(".*.tmp")]:
            remove(stray)
        if fresh:
            return
        for kind in ("step", "best"):
            for saved_step, path in numbered(trainer.run_dir, kind):
                if saved_step > step:
                    remove(path)
        self.best = [entry for entry in self.best if (trainer.run_dir / FOLDER / entry["file"]).exists()]
        if self.settings["keep_best"]:
            self.write_ranking(trainer.run_dir, self.best)

    def rearm(self, step: int) -> None:
        seconds = self.settings["every_seconds"]
        now = time.monotonic()
        self.due = now + seconds if seconds else math.inf
        self.since, self.due_step = (now, step), math.inf
