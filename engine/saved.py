"""Opening a trained run: its config and what it inferred from its data, the file of the weights
`which` names, and the model rebuilt from them (`engine.load`). Nothing in the files is executed:
the weights are read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from . import runs
from .checks import kept_rng
from .components import build_component
from .config import Config, load_config
from .errors import ConfigError, one_line
from .plugins import Plugins
from .types import DataInfo, WithInputTransform

WHICH = ("final", "best", "last")


def load(run_dir: str | Path, which: Literal["final", "best", "last"] = "final") -> torch.nn.Module:
    """The model a run trained, on the CPU in eval mode, rebuilt from the run's config.toml (which
    records what was inferred from the data) and its weights: ``final`` (model.pt: the model a
    completed or interrupted run ended with), ``best`` (by the checkpoints' monitored metric) or
    ``last`` (the latest checkpoint). It takes raw inputs: a run whose data fitted an input
    transform (a standardization) has it in front."""
    run_dir = Path(run_dir)
    config, plugins, info = open_run(run_dir)
    return trained_module(config, plugins, info, *model_file(plugins, run_dir, which))


def open_run(
    run_dir: Path, plugins: Iterable[Any] = (), blocked: Iterable[str] = ()
) -> tuple[Config, Plugins, DataInfo]:
    """A run's config.toml (with `plugins` and without `blocked`) and what the run inferred from
    its data, or a ConfigError saying why the directory holds no trained run."""
    if not (run_dir / runs.CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (it has no {runs.CONFIG})")
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
        return path, runs.MODEL_FORMAT
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
