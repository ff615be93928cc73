"""``[checkpoint]``: when the run takes checkpoints, how many it keeps and its best ones; it owns
the run's ``checkpoints/`` folder and says which file a resume or ``which = "best" | "last"``
means (`find_checkpoint`).

A checkpoint is `trainer.checkpoint()` (the model, optimizer, scheduler, gradient scaler, the
loop state with every RNG and the unlogged losses, and every plugin's `save_plugin_state`)
written atomically to ``checkpoints/step-<step>.pt``. The triggers are independent; any one that
is set fires, at the end of an accumulation window (within one the gradients are half summed)
or of an epoch:

- ``every_steps``: every N steps; ``every_epochs``: at the end of every N-th epoch;
- ``every_seconds`` (default 60): once that long has passed since the last checkpoint, checked
  after each step and at each epoch's end;
- the end of the run, and an interruption (SIGINT, SIGTERM), always; a failed run keeps the
  checkpoints it had (its last state may be what failed).

Of a run's processes, rank 0 alone takes and writes checkpoints: the weights, optimizer state and
data position are every process's (the position counts global batches, so a run resumes with
another number of processes as well).

The training thread takes the checkpoint (a copy of every tensor, on the CPU: a few hundred
microseconds for the MLP job) and one background thread writes it, so the loop does not wait for
the disk; a checkpoint waits for the previous one to be written, and the run's end waits for the
last (an error writing one ends the run there).

``keep_last`` step checkpoints are kept. With ``keep_best`` > 0, an epoch whose ``monitor`` (a
validation metric like ``val_loss``, or a logged one like ``loss``) beats the kept ones by
``mode`` is also linked as ``checkpoints/best-<step>.pt``, ranked in ``checkpoints/best.json``.
A run that continues a directory (resumed, or restarted by ``resume = "auto"``) removes what its killed predecessor
wrote after the checkpoint it starts from (later checkpoints, a half-written one): they belong to
a future that is run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

import engine

runs = engine.runs
FOLDER = "checkpoints"
RANKING = "best.json"  # in checkpoints/: the best checkpoints, best first, with their metric
NUMBERED = re.compile(r"(step|best)-(\d+)\.pt")


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


def numbered(run_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """The run's checkpoints of `kind` ("step" or "best") as (step, path), oldest first."""
    found = []
    for path in (run_dir / FOLDER).glob(f"{kind}-*.pt"):
        match = NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(2)), path))
    return sorted(found)


def checkpoint_path(run_dir: Path, kind: str, step: int) -> Path:
    return run_dir / FOLDER / f"{kind}-{step:09d}.pt"


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint by the monitored metric: first in checkpoints/best.json's ranking."""
    index = run_dir / FOLDER / RANKING
    try:
        ranking = json.loads(index.read_text(encoding="utf-8"))["ranking"]
        return run_dir / FOLDER / own_name(ranking[0]["file"], index) if ranking else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise engine.ConfigError(f"file '{index}' cannot be read: {engine.one_line(error)}") from None


def own_name(name: Any, source: Any) -> str:
    """`name` if it names a checkpoint of the folder (``best-<step>.pt``): a ranking read from a
    file names nothing else, so that nothing outside the folder is read or deleted through it."""
    if not (isinstance(name, str) and NUMBERED.fullmatch(name) and name.startswith("best-")):
        raise engine.ConfigError(f"'{source}' ranks {name!r}, which is not a best checkpoint's file name")
    return name


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
        self.writing: Future[None] | None = None

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
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        if trainer.rank:
            return  # no trigger is armed: rank 0 writes the checkpoints
        self.settings = trainer.config["checkpoint"]
        self.every_steps, self.every_epochs = self.settings["every_steps"], self.settings["every_epochs"]
        self.keep_best, self.monitor = self.settings["keep_best"], self.settings["monitor"]
        fresh = not (trainer.run_dir / FOLDER).exists()
        engine.runs.folder(trainer.run_dir, FOLDER)  # a real folder: pruning must not delete through a link
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self.rearm()
        self.forget_after(trainer, trainer.state.step, fresh)  # a directory reused by a resumed or restarted run

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return trainer.rank != 0  # rank 0 alone takes checkpoints

    @engine.hookimpl
    def after_step(self, state: engine.State, window: engine.Window, trainer: engine.TrainerView) -> None:
        if (self.every_steps and state.step % self.every_steps == 0) or time.monotonic() >= self.due or self.waiting:
            if window.last:
                self.save(trainer)
            else:
                self.waiting = True

    @engine.hookimpl
    def on_epoch_end(self, epoch: int, state: engine.State, trainer: engine.TrainerView) -> None:
        improved = self.improved(epoch, state) if self.keep_best else None
        if (
            improved is not None
            or (self.every_epochs and epoch % self.every_epochs == 0)
            or time.monotonic() >= self.due
            or epoch == trainer.epochs
            or state.stop
        ):
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

    def improved(self, epoch: int, state: engine.State) -> float | None:
        """The monitored value of this epoch if it ranks among the best kept, else None."""
        value = state.monitored(epoch, self.monitor, "checkpoint.monitor")
        if value is None:
            return None
        if len(self.best) < self.keep_best:
            return value
        worst = self.best[-1]["value"]
        return value if (value < worst if self.settings["mode"] == "min" else value > worst) else None

    def save(self, trainer: engine.TrainerView, best: float | None = None) -> None:
        """Take a checkpoint now; write it (and rank it, and prune the old ones) in the background.
        The folder was checked to be the run's own at the start; the writer keeps to it."""
        state, run_dir = trainer.state, trainer.run_dir
        path = checkpoint_path(run_dir, "step", state.step)
        ranking = None
        if best is not None:  # ranked before the checkpoint is taken: its own state includes the rank
            name = checkpoint_path(run_dir, "best", state.step).name
            self.best.append({"step": state.step, "value": best, "file": name})
            self.best.sort(key=lambda entry: entry["value"], reverse=self.settings["mode"] == "max")
            self.best, dropped = self.best[: self.settings["keep_best"]], self.best[self.settings["keep_best"] :]
            ranking = ([dict(entry) for entry in self.best], [entry["file"] for entry in dropped], name)
        taken = snapshot(trainer.checkpoint())
        self.saved, self.waiting = (state.epoch, state.batch, state.step), False
        self.wait()
        self.writing = self.writer.submit(self.write, taken, run_dir, path, ranking)
        self.rearm()

    def write(self, taken: dict[str, Any], run_dir: Path, path: Path, ranking: Any) -> None:
        runs.save(taken, path)
        if ranking is not None:
            kept, dropped, name = ranking
            link(path, run_dir / FOLDER / name)
            self.write_ranking(run_dir, kept)
            for name in dropped:
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / FOLDER / name).unlink()
        for _, old in numbered(run_dir, "step")[: -self.settings["keep_last"]]:
            old.unlink()

    def wait(self) -> None:
        """Until the checkpoint being written is on disk; its error, if writing it failed."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            try:
                writing.result()
            except OSError as error:
                raise engine.TrainingError(f"cannot write a checkpoint: {engine.one_line(error)}") from None

    def write_ranking(self, run_dir: Path, ranking: list[dict[str, Any]]) -> None:
        index = {"monitor": self.settings["monitor"], "mode": self.settings["mode"], "ranking": ranking}
        runs.write_text(run_dir / FOLDER / RANKING, json.dumps(index, indent=2) + "\n")

    def forget_after(self, trainer: engine.TrainerView, step: int, fresh: bool) -> None:
        """Remove what a killed run left after `step` (its later checkpoints, a half-written one)
        and rank only the best checkpoints that exist; in a `fresh` folder, there is none."""
        for stray in [*trainer.run_dir.glob(".*.tmp"), *(trainer.run_dir / FOLDER).glob(".*.tmp")]:
            stray.unlink()
        if fresh:
            return
        for kind in ("step", "best"):
            for saved_step, path in numbered(trainer.run_dir, kind):
                if saved_step > step:
                    path.unlink()
        self.best = [entry for entry in self.best if (trainer.run_dir / FOLDER / entry["file"]).is_file()]
        if self.settings["keep_best"]:
            self.write_ranking(trainer.run_dir, self.best)

    def rearm(self) -> None:
        seconds = self.settings["every_seconds"]
        self.due = time.monotonic() + seconds if seconds else math.inf


def snapshot(value: Any) -> Any:
    """`value` with every tensor copied to the CPU now, so that training can go on while it is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


def link(source: os.PathLike[str], target: os.PathLike[str]) -> None:
    """`target` becomes the file `source` is (a hard link; a copy where links are not possible)."""
    with runs.replacing(target) as temporary:
        temporary.unlink()
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
