"""The Optuna side of a sweep: its study in a journal file (several processes on one machine
share it), the sampler, the pruner, and the trials read back as rows.

The sampler is made anew for each trial, seeded by the job's seed and the trial's number, so that
what it proposes depends only on them and the trials before it: the same job proposes the same
trials in the same order, and a sweep killed and run again proposes what it would have proposed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import engine

JOURNAL = "study.journal"
STUDY = "sweep"  # the one study of a journal file


def need_optuna() -> Any:
    """The optuna module, or a ConfigError saying what to install."""
    try:
        import optuna
    except ImportError:
        raise engine.ConfigError("sweep: optuna is not installed (pip install 'torch-plugin-engine[sweep]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its line per trial: the sweep prints its own
    return optuna


def storage(directory: Path) -> Any:
    """The study's storage: Optuna's journal file in the sweep's folder."""
    need_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(directory / JOURNAL)))


def repair_journal(directory: Path) -> None:
    """Cut a line a killed writer left half-written off the journal's end (Optuna appends whole
    lines, but a kill can land inside one; the next append would make it unreadable), and remove
    the lock file a killed writer held. Only while no other process writes it (the sweep's lock)."""
    path = directory / JOURNAL
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as journal:
                journal.truncate(data.rfind(b"\n") + 1)
    Path(f"{path}.lock").unlink(missing_ok=True)


def open_study(directory: Path, direction: str, metric: str, its_pruner: Any) -> Any:
    """The sweep's study, created on its first run."""
    optuna = need_optuna()
    study = optuna.create_study(
        storage=storage(directory), study_name=STUDY, direction=direction, pruner=its_pruner, load_if_exists=True
    )
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks it experimental
            study.set_metric_names([metric])  # what the plots call the objective
    return study


def load_study(directory: Path, settings: Mapping[str, Any], epochs: int) -> Any:
    """The study as a trial's process uses it: to report and be pruned."""
    optuna = need_optuna()
    sampler = optuna.samplers.RandomSampler()  # never asked: the sweep's process proposes the trials
    return optuna.load_study(
        study_name=STUDY, storage=storage(directory), sampler=sampler, pruner=pruner(settings, epochs)
    )


def pruner(settings: Mapping[str, Any], epochs: int) -> Any:
    """``sweep.pruner``: at each validation (the step is the epoch), whether a trial goes on."""
    pruners = need_optuna().pruners
    warmup = settings["warmup_epochs"]
    if settings["pruner"] == "median":
        # Optuna prunes from step n_warmup_steps on; the epochs count from 1.
        return pruners.MedianPruner(n_startup_trials=settings["startup_trials"], n_warmup_steps=warmup + 1)
    if settings["pruner"] == "hyperband":
        return pruners.HyperbandPruner(min_resource=max(1, warmup), max_resource=epochs, reduction_factor=3)
    return pruners.NopPruner()


def sampler(settings: Mapping[str, Any], seed: int, number: int) -> Any:
    """The sampler that proposes trial `number`, seeded by (seed, number)."""
    samplers = need_optuna().samplers
    trial_seed = int(np.random.SeedSequence([seed, number]).generate_state(1)[0])
    if settings["sampler"] == "tpe":
        return samplers.TPESampler(seed=trial_seed)
    return samplers.RandomSampler(seed=trial_seed)  # "grid": the points are enqueued; nothing is drawn


def grid_point(points: list[dict[str, Any]], seed: int, number: int) -> dict[str, Any]:
    """The point of the grid trial `number` takes: the grid in an order shuffled by the seed."""
    return points[int(np.random.default_rng(seed).permutation(len(points))[number])]


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


@dataclass(slots=True)
class Row:
    """One trial, as the table and the progress lines show it."""

    number: int
    status: str  # completed, pruned, failed, running (or interrupted, when no sweep runs it)
    value: float | None  # the metric: a completed trial's last validation, a pruned one's last report
    epochs: int | None
    seconds: float | None
    parameters: dict[str, Any]
    error: str = ""

    @property
    def name(self) -> str:
        return trial_name(self.number)


STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "running"}


def rows(study: Any, directory: Path) -> list[Row]:
    """Every trial of the study, with what its run's summary says of its epochs and time."""
    found = []
    for trial in study.get_trials(deepcopy=False):
        summary = engine.runs.read_summary(directory / trial_name(trial.number))
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        error = trial.user_attrs.get("error", "") or (summary.get("error", "") if trial.state.name == "FAIL" else "")
        found.append(
            Row(
                number=trial.number,
                status=STATES[trial.state.name],
                value=value,
                epochs=summary.get("epochs_completed"),
                seconds=summary.get("wall_time_s"),
                parameters=dict(trial.params),
                error=error,
            )
        )
    return found
