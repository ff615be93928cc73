"""A job into a run: `setup` builds the Trainer (the setup chain, nothing written), `run` trains it."""

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
from .saved import found_checkpoint
from .trainer import Result, Trainer


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
    directory continues from its last checkpoint (its config.toml is the job unless one is given);
    "auto", like the config's ``resume = "auto"``, continues the run named by ``run_name`` when it
    has a checkpoint and starts it otherwise. `imports` False refuses a job that imports code
    (`load_config`).
    """
    explicit = resume not in (None, "", "auto")
    run_dir = Path(resume) if explicit else None
    if run_dir is not None:
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
    checkpoint = last_checkpoint(found, run_dir) if run_dir is not None else None
    if checkpoint is None and explicit:
        raise ConfigError(f"--resume: run '{run_dir}' has no checkpoint to continue from")
    # The first link of the setup chain: joins the processes of a data-parallel run (None: one).
    distributed = build_component(config, found, "distributed", device=resolve_device(config["device"]))
    try:
        return Trainer(config, found, run_dir=run_dir, checkpoint=checkpoint, distributed=distributed)
    except BaseException as error:
        if distributed is None:
            raise
        stopped = distributed.failed(error)  # another process's error, if it came first
        distributed.close()
        if stopped is error:
            raise
        raise stopped from error


def last_checkpoint(plugins: Plugins, run_dir: Path) -> Path | None:
    """The checkpoint a resumed run continues from, as the plugin that keeps them answers."""
    if not plugins.hook.find_checkpoint.get_hookimpls():
        raise ConfigError(
            f"--resume: no plugin implements find_checkpoint to find the checkpoint of run '{run_dir}' to "
            "continue from (is the plugin that writes checkpoints blocked?)"
        )
    found = plugins.hook.find_checkpoint(run_dir=run_dir, which="last")
    return found_checkpoint(run_dir, found) if found is not None else None


def run(
    job: Mapping[str, Any] | str | Path | Config | None = None,
    *,
    overrides: Iterable[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    resume: str | Path | None = None,
    imports: bool = True,
) -> Result:
    """Train the job and return the model it ended with (in eval mode) and the final metrics.

    `job` is a dict shaped like the TOML file, a path to one, a Config, or None for the default
    job. `plugins` are extra plugin objects or module names; `blocked` names plugins to skip;
    `resume` and `imports` are as for `setup`.
    """
    trainer = setup(job, overrides=overrides, plugins=plugins, blocked=blocked, resume=resume, imports=imports)
    return trainer.fit()
