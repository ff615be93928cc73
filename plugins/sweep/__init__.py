"""``engine sweep JOB.toml``: a hyperparameter search over the job's settings, on Optuna (the
``sweep`` extra), with pruning, trials in parallel processes and a study that survives a kill.

The job's ``[sweep]`` section says what to search (``[sweep.space]``, engine_plugins/sweep/space.py)
and how; every trial is an ordinary run of the job with its values as ``--set`` overrides, so
`engine.load`, ``evaluate``, ``predict``, ``export``, ``plot`` and ``runs`` work on it:

    <runs_dir>/<sweep.name, default: the job file's name>/
        sweep.toml      the job the trials run, resolved; running the command again must match it
        study.journal   Optuna's study (its journal file storage): parameters, values, each
                        validation's metric; several processes share it
        trial-0000/     a run per trial (config.toml, summary.json "completed", "pruned" at an
                        epoch, or "failed" with its error, metrics.jsonl, checkpoints/, model.pt)
        best.toml       the best trial's config: `engine run best.toml` trains it again
        history.png, importance.png   the optimisation history and the parameters' importance

Killed in any way and run again, the command continues the study: finished trials are kept and
the interrupted ones resume from their checkpoints (or start again), up to ``trials`` in all.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import engine

from .space import Dimension, check_values, grid, parse_space

# Validation metrics that are better high; the others named here, a loss and its terms, low.
MAXIMIZED = frozenset({"accuracy", "precision", "recall", "f1", "auroc", "r2"})
MINIMIZED = frozenset({"loss", "mae", "rmse", "mse"})


@dataclass(frozen=True)
class Settings:
    # Read by `engine sweep` alone, never by a trial's training: a trial resumed by a rerun of the
    # sweep (with more trials, say) continues whatever they say now.
    trials: Annotated[int, engine.Range(ge=1), engine.Changeable()] = 20  # in all, across reruns of the command
    metric: Annotated[str, engine.Changeable()] = "val_loss"  # a validation metric of the job
    direction: Annotated[Literal["auto", "minimize", "maximize"], engine.Changeable()] = (
        "auto"  # auto: from the metric's name
    )
    sampler: Annotated[Literal["tpe", "random", "grid"], engine.Changeable()] = "tpe"  # seeded by the job's seed
    pruner: Annotated[Literal["median", "hyperband", "none"], engine.Changeable()] = "median"
    startup_trials: Annotated[int, engine.Range(ge=0), engine.Changeable()] = (
        5  # median: trials that end before one is pruned
    )
    warmup_epochs: Annotated[int, engine.Range(ge=0), engine.Changeable()] = (
        0  # epochs a trial trains before it can be pruned
    )
    parallel: Annotated[int, engine.Range(ge=1), engine.Changeable()] = 1  # trials at once, each in its own process
    threads: Annotated[int, engine.Range(ge=0), engine.Changeable()] = (
        0  # torch threads per trial; 0: the cores / parallel
    )
    name: Annotated[str, engine.Changeable()] = ""  # the sweep's folder in runs_dir; "": the job file's name
    space: Annotated[dict[str, dict[str, Any]], engine.Changeable()] | None = (
        None  # setting -> dimension (engine_plugins/sweep/space.py)
    )

    def __post_init__(self) -> None:
        parse_space(self.space)  # the form of each dimension; its values are checked by the command
        if self.name and not engine.runs.valid_run_name(self.name):
            raise engine.ConfigError(f"sweep.name: {self.name!r} is not one plain name (letters, digits, . _ - + = @)")


@dataclass(slots=True)
class Plan:
    """A sweep, resolved and checked: what the command runs, or reports on."""

    args: argparse.Namespace
    config: engine.Config  # the job with the command's --set, resolved
    dimensions: list[Dimension]
    directory: Path  # runs_dir / the sweep's name
    direction: str | None  # "minimize" or "maximize"; None: auto, and the metric's name does not say
    target: int  # the trials in all: `trials`, or a smaller grid's size
    points: list[dict[str, Any]] | None  # the grid's, with sampler = "grid"

    @property
    def settings(self) -> Any:
        return self.config["sweep"]


@engine.hookimpl
def register_settings():
    return {"sweep": Settings}


@engine.hookimpl
def register_commands(commands: engine.Commands) -> None:
    parser = commands.add(
        "sweep",
        sweep_command,
        "search the settings of [sweep.space] (Optuna); run it again to continue a stopped sweep",
        job=True,
    )
    parser.add_argument("--status", action="store_true", help="print the sweep's table of trials and exit")


def sweep_command(args: argparse.Namespace) -> int:
    from .report import status
    from .sweeper import JOB, Sweeper

    plan = prepare(args)
    if args.status:
        job = plan.directory / JOB
        if job.is_file():  # the settings the sweep last ran with (its trials, say), not this command's
            plan = prepare(argparse.Namespace(**{**vars(args), "job": job, "overrides": []}), plan.directory)
        print(status(plan))
        return 0
    return Sweeper(plan).run(lambda: dry_run(plan))


def prepare(args: argparse.Namespace, directory: Path | None = None) -> Plan:
    """The job resolved with the command's overrides, and the sweep checked, before anything is
    written: every value of the space against its setting's schema, the sampler against the space,
    the direction against the metric."""
    from .study import need_optuna

    def load(extra: list[str]) -> engine.Config:
        return engine.load_config(
            args.job, [*args.overrides, *extra], args.plugin, args.block, imports=not args.no_imports
        )[0]

    config = load([])
    settings = config["sweep"]
    dimensions = parse_space(settings["space"])
    if not dimensions:
        raise engine.ConfigError("sweep.space: no setting to search: add [sweep.space] to the job (see README)")
    need_optuna()
    check_values(dimensions, load)
    points = grid(dimensions) if settings["sampler"] == "grid" else None
    if settings["sampler"] == "grid" and points is None:
        endless = next(d for d in dimensions if d.grid() is None)
        raise engine.ConfigError(
            f'{endless.where}: sampler = "grid" needs a finite set of values (choice, int, or range with step)'
        )
    target = min(settings["trials"], len(points)) if points is not None else settings["trials"]
    name = settings["name"] or (Path(args.job).stem if args.job else "sweep")
    if not engine.runs.valid_run_name(name):
        raise engine.ConfigError(f"sweep.name: the job file's name {name!r} is not one plain name: set sweep.name")
    loss = config["loss"]["name"]
    direction = settings["direction"] if settings["direction"] != "auto" else auto_direction(settings["metric"], loss)
    directory = directory or Path(config["runs_dir"]) / name
    return Plan(args, config, dimensions, directory, direction, target, points)


def auto_direction(metric: str, loss: str | None) -> str | None:
    """Whether `metric` is better low or high, from its name: a loss, a loss term or an error
    low; accuracy and its kin high; None when the name does not say."""
    name = metric.removeprefix("val_")
    if name in MAXIMIZED:
        return "maximize"
    if name in MINIMIZED or name.endswith("loss") or name == loss:
        return "minimize"
    return None


def dry_run(plan: Plan) -> None:
    """The job built once as `engine config` builds it (the data read, every component, a sample
    checked), and validated once, so that a job every trial would fail on, or a metric it does not
    measure, stops the sweep before its folder exists."""
    args, metric = plan.args, plan.settings["metric"]
    trainer = engine.setup(
        args.job,
        overrides=[*args.overrides, "run_name=", "resume="],  # nothing is created: no run is named
        plugins=args.plugin,
        blocked=args.block,
        imports=not args.no_imports,
    )
    try:
        if not trainer.info.n_val:
            raise engine.ConfigError(
                f"sweep.metric: {metric!r} is measured on validation data, and the job has none (data.val_fraction)"
            )
        measured = trainer.validate()
    finally:
        trainer.loaders.close()
    if metric not in measured:
        raise engine.ConfigError(
            f"sweep.metric: {metric!r} is not a validation metric of the job{engine.suggest(metric, measured)}"
        )
    if plan.direction is None:
        raise engine.ConfigError(
            f"sweep.direction: auto cannot tell whether {metric!r} is better low or high: set minimize or maximize"
        )
