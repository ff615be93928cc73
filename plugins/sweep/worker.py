"""A trial process of a sweep (``python -m engine_plugins.sweep.worker``), started by the
sweep's process in a process group of its own, so that Ctrl-C reaches the sweep alone, which
passes it on once.

It reads trials as JSON lines on its standard input and trains each as an ordinary run, continuing
the trial's folder where a stopped sweep left it (``resume = "auto"``), with `SweepTrial` among
its plugins; it answers with a JSON line on its standard output when the trial ends. Whatever the
trials print goes nowhere: the sweep prints a line per trial.

When the sweep's process dies, SIGKILL included, its end of the pipe closes: the trial being
trained stops as SIGTERM stops a run (a checkpoint, an "interrupted" summary) and the process
exits, so that the sweep, run again, resumes the trial. From its first trial on it holds a shared
lock on the sweep's ``.trials.lock``, which a sweep starting again waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import engine

from .study import load_study


class SweepTrial:
    """A trial's link to its study, a plugin of the trial's run: the metric is reported at each
    validation, and a trial the pruner gives up on stops after that epoch as "pruned"."""

    def __init__(self, trial: Any, metric: str, reported: Mapping[int, float]) -> None:
        self.trial, self.metric = trial, metric
        # The last epoch reported: a trial resumed from a checkpoint trains again the epochs it
        # reported before its sweep was killed, and the pruner judged those already.
        self.last = max(reported, default=0)

    @engine.hookimpl
    def on_epoch_end(self, epoch: int, state: engine.State) -> None:
        value = state.monitored(self.metric, "sweep.metric")
        if value is None or epoch < self.last:
            return
        if epoch > self.last:
            self.trial.report(value, epoch)
            self.last = epoch
        if self.trial.should_prune():
            state.stop, state.stop_status = True, "pruned"


def connect(task: Mapping[str, Any]) -> SweepTrial:
    """The `SweepTrial` of `task`, joined to its trial in the study's journal."""
    import optuna

    study = load_study(Path(task["directory"]), task["sweep"], task["epochs"])
    frozen = next(trial for trial in study.get_trials(deepcopy=False) if trial.number == task["number"])
    return SweepTrial(optuna.trial.Trial(study, frozen._trial_id), task["sweep"]["metric"], frozen.intermediate_values)


def train(task: Mapping[str, Any]) -> dict[str, Any]:
    """Train the trial `task` names: the answer says its number, and its error, if it did not end
    as a run ends (its summary.json says how it did)."""
    import torch

    torch.set_num_threads(task["threads"])
    answer: dict[str, Any] = {"number": task["number"]}
    with quiet(keep_errors=task["debug"]):
        try:
            engine.setup(
                task["job"],
                overrides=task["overrides"],
                plugins=[connect(task)],
                blocked=task["blocked"],
                resume="auto",  # a trial a stopped sweep left goes on from its last checkpoint
            ).fit()
        except engine.Interrupted as interrupted:
            answer.update(error=str(interrupted), interrupted=True)
        except engine.EngineError as error:
            answer["error"] = str(error)
        except Exception as error:  # a defect, still one line in the sweep's table
            answer["error"] = f"internal error: {engine.one_line(error)}"
            if task["debug"]:
                traceback.print_exception(error)
    return answer


@contextlib.contextmanager
def quiet(keep_errors: bool) -> Iterator[None]:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.ExitStack() as stack:
        if not keep_errors:
            stack.enter_context(contextlib.redirect_stderr(devnull))
        yield


def read_tasks(tasks: queue.Queue, busy: threading.Event, gone: threading.Event) -> None:
    """The trials the sweep sends, into `tasks`; at the end of the pipe (the sweep ended, or
    died), None, and SIGTERM to this process if it is training: the trial stops as a run does."""
    for line in sys.stdin:
        tasks.put(json.loads(line))
    gone.set()
    tasks.put(None)
    if busy.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def exit_now(number: int, frame: Any) -> None:
    # Outside a run (a run has its own handler while it trains): nothing is being written.
    raise SystemExit(128 + number)


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what anything else writes there goes nowhere
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, exit_now)
    import torch  # noqa: F401 (the start-up's cost, paid while the sweep checks its job)

    tasks: queue.Queue = queue.Queue()
    busy, gone = threading.Event(), threading.Event()
    threading.Thread(target=read_tasks, args=(tasks, busy, gone), daemon=True).start()
    lock = None  # the sweep's, taken with the first trial: held while the process lives
    while (task := tasks.get()) is not None:
        busy.set()
        if gone.is_set():  # the sweep died between sending the trial and now
            return
        if lock is None:
            lock = open(task["lock"], "a")
            fcntl.flock(lock, fcntl.LOCK_SH)
        answer = train(task)
        busy.clear()
        try:
            answers.write(json.dumps(answer) + "\n")
        except BrokenPipeError:
            return


if __name__ == "__main__":
    serve()
    # Every file of its trials is written whole (fsynced, renamed) by now: skip the interpreter's
    # teardown of torch and matplotlib, seconds the sweep would wait for at its end.
    os._exit(0)
