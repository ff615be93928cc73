"""Starting a run: `setup` builds a Trainer from a job (or from a run to resume) with a fresh
plugin manager, `run` trains it.

A resume continues a run directory. Its config.toml is data: used as the job, it imports nothing
it names unless the caller trusts the run (engine/saved.py, `check_trusted`). The run's own
checkpoint says where it continues from, and what it was trained with: a resume that would
change that is refused (engine/resuming.py). One process at a time trains a run (`engine.runs.Lock`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import runs
from .chain import resolve_device
from .components import build_component
from .config import Config, load_config
from .errors import ConfigError
from .plugins import Plugins
from .saved import check_trusted, found_checkpoint
from .trainer import Result, Trainer


def setup(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    resume: str | Path | None = None,
    imports: bool = True,
    trust: bool = False,
    allow_changes: Iterable[str] = (),
) -> Trainer:
    """A Trainer ready to `fit`, with a fresh plugin manager: the setup chain has run, nothing is written.

    Its first link, the ``distributed`` component, joins the processes of a data-parallel run (under
    torchrun); when a later link fails, the processes learn it and leave their group.

    Whatever fails here is a ConfigError naming what is at fault. `resume` continues a run: a run
    directory continues from its last checkpoint (its config.toml is the job unless one is given,
    and imports code only if `trust`); "auto", like the config's ``resume = "auto"``, continues
    the run named by ``run_name`` when it has a checkpoint and starts it otherwise. A resume may
    change only what the settings declare changeable, and what `allow_changes` names (keys or
    sections). `imports` False refuses a job that imports code (`load_config`).
    """
    plugins = list(plugins)
    run_dir, job = resumed(resume, job, plugins, trust)
    config, found = load_config(job, overrides, plugins, blocked, imports=imports)
    run_dir, checkpoint = continued(config, found, run_dir, resume)
    # The first link of the setup chain: joins the processes of a data-parallel run (None: one).
    distributed = build_component(config, found, "distributed", device=resolve_device(config["device"]))
    try:
        return Trainer(
            config, found, run_dir=run_dir, checkpoint=checkpoint, distributed=distributed, allow_changes=allow_changes
        )
    except BaseException as error:
        if distributed is None:
            raise
        stopped = distributed.failed(error)  # another process's error, if it came first
        distributed.close()
        if stopped is error:
            raise
        raise stopped from error


def resumed(resume: str | Path | None, job: Any, plugins: list[Any], trust: bool) -> tuple[Path | None, Any]:
    """The run directory `resume` names (None: none, or "auto"), and the job: the run's
    config.toml when none is given, which imports code only if `trust` (engine/saved.py)."""
    if resume is not None and not str(resume):
        raise ConfigError("--resume: expected a run directory or 'auto', got an empty string")
    if resume in (None, "auto"):
        return None, job
    run_dir = Path(resume)
    if not (run_dir / runs.CONFIG).is_file():
        raise ConfigError(f"--resume: '{run_dir}' is not a run directory (it has no {runs.CONFIG})")
    if job is None:
        check_trusted(run_dir, plugins, trust, "--resume: ")
        job = run_dir / runs.CONFIG
    return run_dir, job


def continued(
    config: Config, plugins: Plugins, run_dir: Path | None, resume: str | Path | None
) -> tuple[Path | None, Path | None]:
    """The run directory the run continues (`resume = "auto"`: the one run_name names, if it
    exists) and the checkpoint it continues from; none when it is a new run."""
    if run_dir is None and (resume == "auto" or config["resume"] == "auto"):
        if not config["run_name"]:
            raise ConfigError("resume = 'auto': name the run to continue with run_name")
        existing = Path(config["runs_dir"]) / config["run_name"]
        if not existing.is_dir():
            return None, None
        run_dir, explicit = existing, False
    elif run_dir is None:
        runs.check_free(config["runs_dir"], config["run_name"])  # `fit` creates it exclusively
        return None, None
    else:
        explicit = True
    checkpoint = last_checkpoint(plugins, run_dir)
    if checkpoint is None and explicit:
        # The truest reason first: a process training the run may not have written one yet. (Where
        # there is one, rank 0's lock refuses a run in use; here the other ranks of a run whose
        # rank 0 took it already would find it held.)
        runs.check_not_held(run_dir)
        raise ConfigError(f"--resume: run '{run_dir}' has no checkpoint to continue from{why_not(run_dir)}")
    return run_dir, checkpoint


def last_checkpoint(plugins: Plugins, run_dir: Path) -> Path | None:
    """The checkpoint a resumed run continues from, as the plugin that keeps them answers."""
    if not plugins.hook.find_checkpoint.get_hookimpls():
        raise ConfigError(
            f"--resume: no plugin implements find_checkpoint to find the checkpoint of run '{run_dir}' to "
            "continue from (is the plugin that writes checkpoints blocked?)"
        )
    found = plugins.hook.find_checkpoint(run_dir=run_dir, which="last")
    return found_checkpoint(run_dir, found) if found is not None else None


def why_not(run_dir: Path) -> str:
    """Why a run has no checkpoint, as its summary says, and what to do instead."""
    summary = runs.read_summary(run_dir)
    said = f"{summary.get('status', 'no summary')}" + (f": {summary['error']}" if summary.get("error") else "")
    return f" (its summary: {said}); start it again under another run_name, or remove the directory"


def run(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    resume: str | Path | None = None,
    imports: bool = True,
    trust: bool = False,
    allow_changes: Iterable[str] = (),
) -> Result:
    """Train the job and return the model it ended with (in eval mode) and the final metrics.

    `job` is a dict shaped like the TOML file, a path to one, a Config, or None for the default
    job. `plugins` are extra plugin objects or module names; `blocked` names plugins to skip;
    `resume`, `imports`, `trust` and `allow_changes` are as for `setup`.
    """
    trainer = setup(
        job,
        overrides=overrides,
        plugins=plugins,
        blocked=blocked,
        resume=resume,
        imports=imports,
        trust=trust,
        allow_changes=allow_changes,
    )
    return trainer.fit()
