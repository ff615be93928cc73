"""Opening a trained run: its config and what it inferred from its data, the file of the weights
`which` names, and the model rebuilt from them (`engine.load`).

A run directory is data: opening one imports nothing it names unless the caller says so. A
config.toml that names code (plugin modules or files, ``"package.module:factory"`` components) is
refused, listing what it would import, unless the caller trusts the run (`trust`, on the command
line ``--trust-run``) or gives those plugins itself; a run of built-in components opens with no
import beyond the installed plugins. The weights are read with ``torch.load(weights_only=True)``,
from files inside the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from . import runs
from .checks import kept_rng
from .components import build_component
from .config import Config, load_config, merged_job, recorded, references
from .errors import ConfigError, one_line
from .plugins import Plugins
from .types import DataInfo, WithInputTransform

WHICH = ("final", "best", "last")


def load(
    run_dir: str | Path,
    which: Literal["final", "best", "last"] = "final",
    *,
    plugins: Iterable[Any] = (),
    trust: bool = False,
) -> torch.nn.Module:
    """The model a run trained, on the CPU in eval mode, rebuilt from the run's config.toml (which
    records what was inferred from the data) and its weights: ``final`` (model.pt: the model a
    completed or interrupted run ended with), ``best`` (by the checkpoints' monitored metric) or
    ``last`` (the latest checkpoint). It takes raw inputs: a run whose data fitted an input
    transform (a standardization) has it in front.

    A run whose config names code is refused unless `trust` is True or `plugins` gives its
    plugins (see the module docstring)."""
    run_dir = Path(run_dir)
    config, found, info = open_run(run_dir, plugins, trust=trust)
    return trained_module(config, found, info, *model_file(found, run_dir, which))


def open_run(
    run_dir: Path, plugins: Iterable[Any] = (), blocked: Iterable[str] = (), *, trust: bool = False
) -> tuple[Config, Plugins, DataInfo]:
    """A run's config.toml (with `plugins` and without `blocked`) and what the run inferred from
    its data, or a ConfigError saying why the directory holds no trained run, or what code its
    config would import when the run is not trusted (`check_trusted`)."""
    plugins = list(plugins)
    if not (run_dir / runs.CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (it has no {runs.CONFIG})")
    check_trusted(run_dir, plugins, trust)
    config, found = load_config(run_dir / runs.CONFIG, plugins=plugins, blocked=blocked)
    inferred = config["inferred"]
    if not inferred["task"]:
        raise ConfigError(f"'{run_dir / runs.CONFIG}' records no [inferred] sizes: the run never started")
    info = DataInfo(
        inferred["n_features"],
        inferred["n_outputs"],
        inferred["task"],
        0,
        threshold=inferred["threshold"],
        input_shape=tuple(inferred["input_shape"]),
        classes=tuple(inferred["classes"]),
    )
    return config, found, info


def check_trusted(run_dir: Path, plugins: Iterable[Any] = (), trust: bool = False, what: str = "") -> None:
    """A ConfigError listing the code the run's config.toml would import, read without importing
    it, unless the run is trusted; plugins the caller gives itself (`plugins`) are its own."""
    if trust:
        return
    job, base = merged_job(run_dir / runs.CONFIG)
    given = {recorded(item) for item in plugins if isinstance(item, str)}
    given |= {item.__name__ for item in plugins if isinstance(getattr(item, "__name__", None), str)}
    foreign = [
        f"{found.key} = {found.value!r}"
        for found in references(job)
        if not (found.key.startswith("plugins[") and recorded(found.value, base) in given)
    ]
    if foreign:
        raise ConfigError(
            f"{what}run '{run_dir}' names code that opening it would import: {', '.join(foreign)}; a run "
            "directory is data: pass --trust-run (trust=True) if you trust it, or give its plugins with --plugin"
        )


def model_file(plugins: Plugins, run_dir: Path, which: str) -> tuple[Path, str]:
    """The file holding the weights `which` names, and its format: model.pt for ``final``, else
    the checkpoint the plugin that keeps them finds (`find_checkpoint`)."""
    if which not in WHICH:
        raise ConfigError(f"which: expected one of {', '.join(map(repr, WHICH))}, got {which!r}")
    if which == "final":
        path = run_dir / runs.MODEL
        if not path.is_file():
            raise ConfigError(
                f"run '{run_dir}' has no {runs.MODEL}: it did not complete or stop cleanly (its latest checkpoint: "
                "which='last', on the command line --which last)"
            )
        return runs.inside(run_dir, path, "model file"), runs.MODEL_FORMAT
    if not plugins.hook.find_checkpoint.get_hookimpls():
        raise ConfigError(f"which = {which!r}: no plugin finds checkpoints (find_checkpoint); is one blocked?")
    found = plugins.hook.find_checkpoint(run_dir=run_dir, which=which)
    if found is None:
        raise ConfigError(f"run '{run_dir}' has no {which} checkpoint")
    return found_checkpoint(run_dir, found), runs.CHECKPOINT_FORMAT


def found_checkpoint(run_dir: Path, found: Any) -> Path:
    """What `find_checkpoint` returned, checked: a path inside the run (a plugin's other answer is
    a ConfigError, not a TypeError further on)."""
    if not isinstance(found, (str, PathLike)):
        raise ConfigError(f"hook find_checkpoint returned {type(found).__name__} {found!r}, not a path")
    return runs.inside(run_dir, Path(found), "checkpoint")


def trained_module(config: Config, plugins: Plugins, info: DataInfo, path: Path, expected: str) -> torch.nn.Module:
    """The run's model rebuilt on the CPU in eval mode, behind its input transform if the run had
    one, with the weights of the file `path` (of format `expected`)."""
    with kept_rng(torch.device("cpu")):  # building draws initial weights: opening a run leaves the RNGs be
        module = build_component(config, plugins, "model", info=info, device=torch.device("cpu"))
    transform = config["inferred"]["input_transform"]
    if transform:
        module = WithInputTransform(plugins.component("input_transform", transform).factory(info=info), module)
    if expected == runs.CHECKPOINT_FORMAT:
        saved = read_checkpoint(plugins, path, {"model": module.state_dict()})
    else:
        saved = runs.load(path, expected)
    try:  # a checkpoint's evaluated model (an average) where it kept one: what validation ranked
        module.load_state_dict(saved.get("evaluated") or saved["model"])
    except RuntimeError as error:
        raise ConfigError(f"file '{path}' does not fit the model of the run's config.toml: {one_line(error)}") from None
    return module.eval()


def read_checkpoint(plugins: Plugins, path: Path, template: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path` as `Trainer.checkpoint` made it: read by the plugin that wrote it
    (`read_checkpoint`, into `template`'s tensors), else as one ordinary checkpoint file."""
    read = plugins.hook.read_checkpoint(path=path, template=template)
    return dict(read) if read is not None else runs.load(path, runs.CHECKPOINT_FORMAT)
