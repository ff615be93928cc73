"""The sweep's process: it owns the sweep's folder (an OS lock), proposes the trials, hands them to
``parallel`` trial processes (worker.py), tells the study how each ended, and prints a line per
trial and the table at the end.

A trial's outcome is read from its run's summary.json, the one record that survives any kill: a
trial the study still holds as running when the sweep starts again was interrupted, and is told
from its summary if its run ended, or resumed (`resume = "auto"`: from its last checkpoint, or
from the start) if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import engine

from .report import SWEEP_LOCK, best, heading, plots, progress, table, write_best
from .space import overrides
from .study import JOURNAL, grid_point, load_study, open_study, pruner, repair_journal, rows, sampler, trial_name

if TYPE_CHECKING:
    from . import Plan

JOB = "sweep.toml"
TRIALS_LOCK = ".trials.lock"  # shared by the trial processes while they live
# What may change between two runs of one sweep: how many trials, and how they share the machine.
FREE = frozenset({"sweep.trials", "sweep.parallel", "sweep.threads"})


class Worker:
    """A trial process, and the thread that passes on its answers."""

    def __init__(self, threads: int, events: queue.Queue, debug: bool) -> None:
        command = [sys.executable, "-m", f"{__package__}.worker"]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if debug else subprocess.DEVNULL,
            text=True,
            env=environment,
            process_group=0,  # Ctrl-C at the terminal reaches the sweep, which passes it on once
        )
        self.trial: int | None = None
        threading.Thread(target=self.read, args=(events,), daemon=True).start()

    def read(self, events: queue.Queue) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                events.put((self, json.loads(line)))
        events.put((self, None))  # the process ended

    def send(self, task: dict[str, Any]) -> None:
        self.trial = task["number"]
        with contextlib.suppress(OSError):  # it died: its end arrives as an event
            self.process.stdin.write(json.dumps(task) + "\n")
            self.process.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # it ends when it has no trial


class Sweeper:
    def __init__(self, plan: Plan) -> None:
        self.plan, self.settings = plan, plan.settings
        self.directory = plan.directory.absolute()
        self.events: queue.Queue = queue.Queue()
        self.workers: list[Worker] = []
        self.running: dict[int, Worker] = {}  # trial number -> the process training it
        self.pending: list[int] = []  # interrupted trials to resume before new ones are proposed
        self.stopping = 0  # the signal that stops the sweep
        self.study: Any = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = self.settings["threads"] or max(1, cores // self.settings["parallel"])

    def run(self, check: Callable[[], None]) -> int:
        """The sweep, to its end or to a signal: its exit code. `check` is the job's dry run: the
        trial processes start meanwhile (torch's import takes seconds), and end if it fails."""
        try:
            for _ in range(min(self.settings["parallel"], self.unfinished())):
                self.start_worker()
            check()
            with self.owned():
                self.write_job()
                wait_for_trials(self.directory)
                repair_journal(self.directory)
                its_pruner = pruner(self.settings, self.plan.config["epochs"])
                self.study = open_study(self.directory, self.plan.direction, self.settings["metric"], its_pruner)
                with self.signals():
                    self.recover()
                    self.loop()
        finally:
            self.close_workers()
        return self.end()

    def unfinished(self) -> int:
        """How many trials are left to train, as the study said when this sweep began (read
        without a lock: a guess of how many trial processes to start early)."""
        if not (self.directory / JOURNAL).is_file():
            return self.plan.target
        trials = load_study(self.directory, self.settings, self.plan.config["epochs"]).get_trials(deepcopy=False)
        finished = sum(trial.state.name in ("COMPLETE", "PRUNED", "FAIL") for trial in trials)
        return max(0, self.plan.target - finished)

    # --- the folder and the job ---------------------------------------------------------------------

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """The sweep's folder, created if new, held by this process (an OS lock the kernel releases
        when the process dies, however it dies)."""
        directory = self.directory
        if directory.is_dir() and not (directory / JOB).is_file():
            if (directory / engine.runs.CONFIG).is_file():
                raise engine.ConfigError(f"sweep.name: '{directory}' is a run's folder: set another sweep.name")
            if any(path.name not in (SWEEP_LOCK, TRIALS_LOCK, JOURNAL) for path in directory.iterdir()):
                raise engine.ConfigError(f"sweep.name: '{directory}' is not a sweep's folder: set another sweep.name")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise engine.ConfigError(f"runs_dir: cannot create '{directory}': {engine.one_line(error)}") from None
        with open(directory / SWEEP_LOCK, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise engine.ConfigError(
                    f"sweep '{self.plan.directory}' is being run by process {lock.read().strip() or '?'} "
                    "(--status shows it)"
                ) from None
            lock.truncate(0)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield

    def write_job(self) -> None:
        """sweep.toml: the job the trials run. A sweep that continues must run the job it started
        with, apart from how many trials and how they share the machine."""
        path, text = self.directory / JOB, engine.dump_toml(self.plan.config)
        if path.is_file():
            changed = difference(flat(tomllib.loads(path.read_text(encoding="utf-8"))), flat(tomllib.loads(text)))
            if changed:
                raise engine.ConfigError(
                    f"sweep '{self.plan.directory}' was started with another job: {changed}; run it with the job it "
                    "started with, or set another sweep.name"
                )
        engine.runs.write_text(path, "# The job every trial of this sweep runs, with its values as --set.\n" + text)

    # --- the trials ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """The trials a stopped sweep left running: told from their runs' summaries if those runs
        ended, else resumed first."""
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state.name == "WAITING":  # a grid point enqueued, and the sweep killed before asking it
                self.pending.append(self.study.ask(self.distributions()).number)
            elif trial.state.name == "RUNNING":
                summary = engine.runs.read_summary(self.directory / trial_name(trial.number))
                if summary.get("status") in ("completed", "pruned", "failed"):
                    self.finish(trial.number, None)
                else:
                    self.pending.append(trial.number)
        if self.pending:
            names = ", ".join(trial_name(number) for number in self.pending)
            print(f"Resuming the trials a stopped sweep left: {names}", flush=True)

    def loop(self) -> None:
        while True:
            while len(self.running) < self.settings["parallel"] and not self.stopping:
                number = self.pending.pop(0) if self.pending else self.ask()
                if number is None:
                    break
                worker = next((worker for worker in self.workers if worker.trial is None), None) or self.start_worker()
                worker.send(self.task(number))
                self.running[number] = worker
            if not self.running:
                return
            self.receive(*self.next_event())

    def ask(self) -> int | None:
        """A new trial, proposed by a sampler seeded by the job's seed and its number; None when
        the sweep has all its trials."""
        trials = self.study.get_trials(deepcopy=False)
        if len(trials) >= self.plan.target:
            return None
        number, seed = len(trials), self.plan.config["seed"]
        if self.plan.points is not None:
            self.study.enqueue_trial(grid_point(self.plan.points, seed, number))
        self.study.sampler = sampler(self.settings, seed, number)
        return self.study.ask(self.distributions()).number

    def distributions(self) -> dict[str, Any]:
        return {dimension.key: dimension.distribution() for dimension in self.plan.dimensions}

    def task(self, number: int) -> dict[str, Any]:
        """What a trial process needs to train trial `number`: the job and its --set."""
        parameters = self.study.get_trials(deepcopy=False)[number].params
        return {
            "number": number,
            "lock": str(self.directory / TRIALS_LOCK),
            "job": str(self.directory / JOB),
            "overrides": [
                *overrides(self.plan.dimensions, parameters),
                f"runs_dir={self.directory}",
                f"run_name={trial_name(number)}",
            ],
            "blocked": self.plan.args.block,
            "directory": str(self.directory),
            "sweep": {key: value for key, value in self.settings.items() if key != "space"},
            "epochs": self.plan.config["epochs"],
            "threads": self.threads,
            "debug": self.plan.args.debug,
        }

    def start_worker(self) -> Worker:
        worker = Worker(self.threads, self.events, self.plan.args.debug)
        self.workers.append(worker)
        return worker

    def next_event(self) -> tuple[Worker, dict[str, Any] | None]:
        while True:
            with contextlib.suppress(queue.Empty):  # a timeout, so that signals are handled
                return self.events.get(timeout=0.5)

    def receive(self, worker: Worker, answer: dict[str, Any] | None) -> None:
        """A trial process answered (the trial ended), or ended itself."""
        number, worker.trial = worker.trial, None
        if answer is None:
            self.workers.remove(worker)
            code = worker.process.wait()
            if number is not None:
                del self.running[number]
                if not self.stopping:  # else it resumes when the sweep runs again
                    self.finish(number, f"its process ended with exit code {code}")
            return
        del self.running[number]
        if answer.get("interrupted"):
            if not self.stopping:  # a signal sent to the trial's process alone: it resumes now
                self.pending.insert(0, number)
            return
        self.finish(number, answer.get("error"))

    def finish(self, number: int, error: str | None) -> None:
        """Tell the study how trial `number` ended, from its run's summary, and print its line."""
        from optuna.trial import Trial, TrialState

        summary = engine.runs.read_summary(self.directory / trial_name(number))
        status, metric = summary.get("status"), self.settings["metric"]
        value = summary.get(metric)
        if status == "completed" and isinstance(value, (int, float)) and math.isfinite(value):
            self.study.tell(number, value, skip_if_finished=True)
        elif status == "pruned":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            if status == "completed":
                error = f"the run ended without a finite {metric}"
            message = summary.get("error") or error or f"its run ended {status or 'before it started'}"
            frozen = self.study.get_trials(deepcopy=False)[number]
            Trial(self.study, frozen._trial_id).set_user_attr("error", message)
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        found = rows(self.study, self.directory)
        row = next(row for row in found if row.number == number)
        print(progress(self.plan, row, found), flush=True)
        top = best(found, self.plan.direction)
        if top is not None and top.number == number:
            write_best(self.plan, top)

    # --- signals and the end ------------------------------------------------------------------------

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the sweep: each running trial receives the signal once (it
        checkpoints and stops, as a run does), no new one starts, and the command ends; run again,
        it resumes them. A second signal is passed on too: the trials stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(number: int, frame: Any) -> None:
            if not self.stopping:
                self.stopping = number
                os.write(2, b"stopping: the running trials write a checkpoint (the same command continues them)\n")
            for worker in list(self.running.values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, number)

        previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def close_workers(self) -> None:
        """End the trial processes: an idle one at once (it holds nothing), one still training
        (the sweep itself failed) as SIGTERM stops a run, with a checkpoint to resume from."""
        for worker in self.workers:
            worker.close()
            if worker.trial is None:
                worker.process.kill()
            else:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.process.wait()

    def end(self) -> int:
        """The table; with the sweep complete, best.toml and the plots. The exit code."""
        found = rows(self.study, self.directory)
        for row in found if self.stopping else ():
            row.status = "interrupted" if row.status == "running" else row.status
        print(heading(self.plan, found))
        print(table(self.plan, found), flush=True)
        if self.stopping:
            command = shlex.join(["python", "-m", "engine", *self.plan.args.argv])
            print(f"interrupted by {signal.Signals(self.stopping).name}; continue with: {command}", file=sys.stderr)
            return 128 + self.stopping
        top = best(found, self.plan.direction)
        if top is None:
            raise engine.TrainingError(f"sweep '{self.plan.directory}': no trial completed (the table says why)")
        print(f"Best: {write_best(self.plan, top)} ({top.name})")
        for line in plots(self.study, self.plan.directory, self.settings["metric"]):
            print(line)
        return 0


def wait_for_trials(directory: Path) -> None:
    """Wait until the trial processes of a killed sweep have ended: each stops its trial as SIGTERM
    stops a run, with a checkpoint, when it finds the sweep gone."""
    with open(directory / TRIALS_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Waiting for the trials of the stopped sweep to write their checkpoints", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_UN)


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """A config's keys, dotted."""
    return {
        f"{section}.{key}" if isinstance(values, dict) else section: value
        for section, values in config.items()
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
    }


def difference(before: dict[str, Any], now: dict[str, Any]) -> str:
    """The first key whose value changed (but those in `FREE`), in words; "" when none did."""
    for key in dict.fromkeys([*before, *now]):
        if key not in FREE and before.get(key) != now.get(key):
            return f"{key} = {shown_toml(before.get(key))} then, {shown_toml(now.get(key))} now"
    return ""


def shown_toml(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value)
