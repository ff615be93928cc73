"""`predict` and `evaluate` on a run's model, and the files they read and write: a ``data``
component named after the file's suffix (``path``, ``val_path``), or the run's own when its
factory lists the suffix in its ``suffixes`` attribute (token files: ``.bin``, ``.npy``, text),
reads inputs and labels with the checks training applies, and a ``predictions`` component, named
likewise, writes what `predict` returns."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine

from .backends import EAGER, Backend, backend_of, known_backend, load_backend
from .exporting import Run

EVALUATIONS = "evaluations"  # in the run directory: what `evaluate` writes


def predictions(backend: Backend, x: Any, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """The backend's predictions for the inputs `x` (N samples of the run's input shape: [N,
    n_features], [N, C, H, W] for images; array or tensor), in batches:
    ``class`` (indices) and ``probability`` ([N, classes]) for classification, ``class`` (0 or 1)
    and ``probability`` ([N], of class 1) for binary labels, ``value`` for regression; for a
    sequence task (token ids [N, T]) a ``class`` per position [N, T] and ``probability`` over the
    vocabulary, the last axis [N, T, vocabulary]."""
    info = backend.info
    check_batch_size(batch_size)
    x, width = inputs(x, info)
    wrong = misfit(tuple(x.shape[1:]) if x.dim() > 1 else (width,), info)
    if wrong:
        raise engine.ConfigError(f"inputs have {wrong[0]}, but the model was trained on {wrong[1]}")
    if len(x) == 0:
        raise engine.ConfigError("the inputs hold no samples")
    outputs = torch.cat([backend(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]).detach()
    if info.task in ("classification", "sequence"):
        # softmax turns logits into probabilities, and leaves log-probabilities' exp unchanged; the
        # classes (a vocabulary) are the last axis of [N, classes] and of [N, T, vocabulary].
        probability = torch.softmax(outputs.float(), dim=-1)
        return {"class": probability.argmax(dim=-1), "probability": probability}
    if info.task == "binary":  # one logit: the probability of class 1, which wins above the threshold
        probability = torch.sigmoid(outputs.float().reshape(-1))
        return {"class": (probability > info.threshold).long(), "probability": probability}
    return {"value": outputs}


def predict(
    run_dir: str | Path,
    x: Any,
    *,
    which: str = "final",
    backend: str = "auto",
    batch_size: int = 1024,
    plugins: Iterable[Any] = (),
    trust: bool = False,
    pass_non_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """A run's predictions for the inputs `x` (see `predictions`), on `backend` (see
    `load_backend`); inputs that are not finite are refused unless `pass_non_finite`."""
    loaded = load_backend(run_dir, which, backend, plugins=plugins, trust=trust)
    if not pass_non_finite:
        finite_inputs(inputs(x, loaded.info)[0], "the inputs")
    return predictions(loaded, x, batch_size)


def check_batch_size(size: int) -> int:
    if size < 1:
        raise engine.ConfigError(f"--batch-size: expected 1 or more samples, got {size}")
    return size


def read_inputs(
    run: Run, file: str | Path, overrides: Sequence[str] = (), *, pass_non_finite: bool = False
) -> torch.Tensor:
    """The inputs of a data file, read by the data component named after its suffix (without
    labels where the component can do without), checked against the run's input shape, holding
    samples, and (unless `pass_non_finite`) finite."""
    config, found = file_config(run, Path(file), overrides, labelled=False)
    cpu = torch.device("cpu")
    data = engine.build_component(
        config, found, "data", seed=config["seed"], device=cpu, labelled=False, inferred=config["inferred"]
    )
    x, width = inputs(data[0] if isinstance(data, tuple) else data, run.info)
    if len(x) == 0:
        raise engine.ConfigError(f"--data '{file}': holds no samples")
    wrong = misfit(tuple(x.shape[1:]) if x.dim() > 1 else (width,), run.info)
    if wrong:
        raise wrong_shape(file, wrong, run)
    if not pass_non_finite:
        finite_inputs(x, f"--data '{file}'")
    return x


def finite_inputs(x: torch.Tensor, where: str) -> None:
    """A ConfigError naming the first row (sample) of `x` that holds NaN or inf."""
    if not x.is_floating_point():
        return  # token ids
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    count = int(bad.sum())
    if count:
        first = int(bad.nonzero()[0, 0])
        raise engine.ConfigError(
            f"{where}: row {first} (counting from 0) holds a value that is not finite (NaN or inf), and {count} "
            f"row{'s' if count > 1 else ''} in all; predict them anyway with --pass-non-finite"
        )


def inputs(x: Any, info: engine.DataInfo) -> tuple[torch.Tensor, int]:
    """`x` (an array or tensor) as a CPU tensor of samples: float32 features, one a column when the
    model takes one, or for a sequence task int64 token ids [N, T]; and its features (or tokens)
    per sample, for the caller to check (1 for a flat array: a value per sample; 0 for a single
    number)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).cpu()
    token_ids = info.task == "sequence" and not x.is_floating_point()
    x = x.long() if token_ids else x.float()
    if x.dim() == 1 and info.n_features == 1:
        x = x[:, None]
    return x, x.shape[-1] if x.dim() > 1 else x.dim()


def misfit(found: tuple[int, ...], info: engine.DataInfo) -> tuple[str, str] | None:
    """When input samples of shape `found` (a flat array's: its width, as `inputs` counts it) do
    not fit the run's model: what they have and what the run trained on, in words; None when they
    fit. Samples must have the run's input shape (its [inferred] ``input_shape``: C x H x W for
    images; a run that recorded none: its width)."""
    expected = tuple(info.input_shape) or (info.n_features,)
    if found == expected:
        return None
    if len(found) == len(expected) == 1:
        return f"{found[0]} features per sample", str(expected[0])
    return f"samples of shape {found}", f"samples of shape {expected}"


def wrong_shape(file: str | Path, wrong: tuple[str, str], run: Run) -> engine.ConfigError:
    return engine.ConfigError(f"--data '{file}': {wrong[0]}, but run '{run.run_dir}' was trained on {wrong[1]}")


def write_predictions(run: Run, columns: Mapping[str, torch.Tensor], out: str | Path, overrides: Sequence[str] = ()):
    """Write `columns` with the ``predictions`` component named after `out`'s suffix."""
    writer = predictions_writer(run, Path(out), overrides)
    writer(Path(out), {key: value.numpy() for key, value in columns.items()})


def predictions_writer(run: Run, out: Path, overrides: Sequence[str] = ()) -> Any:
    """The ``predictions`` component named after `out`'s suffix, with its settings."""
    name = suffix(out, "--out")
    table = run.plugins.components.get("predictions", {})
    if name not in table:
        raise engine.ConfigError(
            f"--out '{out}': no predictions component writes .{name} files{engine.suggest(name, table)}"
        )
    config, found = run.load_config(overrides=[f"predictions.name={name}", *overrides])
    return engine.build_component(config, found, "predictions")


def suffix(path: Path, option: str) -> str:
    if not path.suffix:
        raise engine.ConfigError(
            f"{option} '{path}': the file name needs a suffix: it names the component that handles the file"
        )
    return path.suffix.lstrip(".").lower()


def file_config(
    run: Run,
    file: Path,
    overrides: Sequence[str],
    labelled: bool,
    changes: Mapping[str, Any] | None = None,
    plugins: Iterable[Any] = (),
) -> tuple[engine.Config, engine.Plugins]:
    """The run's config with ``[data]`` reading `file`: the data component named after its suffix,
    with the run's own settings for it when the run used the same one, and the file as every split
    it reads (so that none is drawn from it); `changes` replace top-level keys or sections."""
    if not file.is_file():
        raise engine.ConfigError(f"--data: file '{file}' does not exist")
    reader = suffix(file, "--data")
    table = run.plugins.components.get("data", {})
    own = run.config["data"]["name"]
    if own in table and f".{reader}" in getattr(table[own].factory, "suffixes", ()):
        reader = own  # the run's own component reads files of this suffix (token files, text)
    if reader not in table:
        raise engine.ConfigError(
            f"--data '{file}': no data component reads .{reader} files{engine.suggest(reader, table)}"
        )
    params = inspect.signature(table[reader].factory).parameters
    if "path" not in params:
        raise engine.ConfigError(
            f"--data '{file}': data component {reader!r} reads no files (it has no setting 'path')"
        )
    job = run.config.to_dict()
    old = run.config["data"]
    data = {key: value for key, value in old.items() if key not in old.params and key != "name"}
    if old["name"] == reader:
        data.update(old.component_settings())
    data.update(name=reader, path=str(file.absolute()))
    for split in ("val_path", "test_path"):
        if split in params:
            data[split] = str(file.absolute()) if labelled else ""
    job["data"] = data
    job.update(changes or {})
    return run.load_config(job, overrides, plugins)


class EvaluationData:
    """Checks the evaluation file against the run and gives the trainer the run's DataInfo, so that
    the loss and metrics are built as they were for the run (a file holding some classes only
    still has the run's class count)."""

    def __init__(self, run: Run, file: Path) -> None:
        self.run, self.file = run, file

    @engine.hookimpl(wrapper=True)
    def build_loaders(self) -> Iterator[None]:
        loaders = yield
        found, info, run = loaders.info, self.run.info, self.run
        where = f"--data '{self.file}'"
        wrong = misfit(tuple(found.input_shape) or (found.n_features,), info)
        if wrong:
            raise wrong_shape(self.file, wrong, run)
        if found.task != info.task:
            raise engine.ConfigError(
                f"{where}: its labels are for {found.task}, but run '{run.run_dir}' did {info.task}"
            )
        if info.task in ("classification", "sequence") and found.n_outputs > info.n_outputs:
            raise engine.ConfigError(
                f"{where}: has class index {found.n_outputs - 1}, but run '{run.run_dir}' has {info.n_outputs} classes"
            )
        if info.task == "regression" and found.n_outputs != info.n_outputs:
            raise engine.ConfigError(
                f"{where}: {found.n_outputs} target columns, but run '{run.run_dir}' predicts {info.n_outputs}"
            )
        loaders.info = replace(info, n_train=found.n_train, n_val=found.n_val)  # the run's classes and sizes
        return loaders


class Served(torch.nn.Module):
    """A backend as the module validation calls."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(x)


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    *,
    which: str = "final",
    backend: str | Backend = "auto",
    overrides: Sequence[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    trust: bool = False,
) -> dict[str, Any]:
    """The loss terms and metrics of a run's model on a labelled data file, by the run's own
    validation: a Trainer built from the run's config (nothing is written, nothing trained, the
    global RNGs left as they were) with the file as its validation data and `backend` as the
    model. On the run's validation data it gives the run's final validation figures. A figure
    that is not finite (the model's outputs overflow on this data) is None, and named in
    ``non_finite``."""
    run = Run.open(run_dir, which, plugins, blocked, trust)
    return evaluated(run, Path(data), backend, overrides)[0]


def evaluated(
    run: Run, file: Path, backend: str | Backend = "auto", overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], Backend]:
    """`evaluate` of an open run, and the backend it ran on. The file is read and checked before
    the backend is loaded, which may export the model into the run: a file that cannot be
    evaluated leaves nothing written."""
    if not isinstance(backend, Backend):
        known_backend(run, backend)
    # On the CPU, where the backends run; no accelerate component: the train step is never called.
    changes: dict[str, Any] = {"device": "cpu", "accelerate": {"name": None}}
    # The trainer's setup seeds every RNG (every CUDA device's too): all kept as they were.
    with engine.kept_rng(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        trainer = engine.Trainer(*file_config(run, file, overrides, True, changes, [EvaluationData(run, file)]))
        try:
            chosen = backend if isinstance(backend, Backend) else backend_of(run, backend, takes_targets(run))
            model = run.config.to_dict()["model"]
            if chosen.name != EAGER and (model["output"] or model["targets"]):
                # An export takes the inputs alone and returns the logits alone: validation calls it so.
                trainer.loaders.close()
                changes["model"] = {**model, "output": "", "targets": ""}
                trainer = engine.Trainer(*file_config(run, file, overrides, True, changes, [EvaluationData(run, file)]))
            # compute_loss hooks (a regularizer) read the trained weights from the trainer's module,
            # which the eager backend is, called as training called it.
            weights = engine.trained_module(run.config, run.plugins, run.info, run.weights, run.weights_format)
            trainer.module.load_state_dict(weights.state_dict())
            metrics = trainer.validate(model=trainer.module if chosen.name == EAGER else Served(chosen))
        finally:
            trainer.loaders.close()
    result: dict[str, Any] = {"run": str(run.run_dir), "which": run.which, "data": str(file)}
    result.update(samples=trainer.info.n_val, backend=chosen.name)
    result.update({name.removeprefix("val_"): value for name, value in metrics.items()})
    non_finite = [name for name, value in result.items() if isinstance(value, float) and not math.isfinite(value)]
    if non_finite:  # JSON has no inf or nan
        result.update(dict.fromkeys(non_finite), non_finite=non_finite)
    return result, chosen


def takes_targets(run: Run) -> str:
    """Why an export cannot evaluate the run's model (it computes its loss from its targets), or ''."""
    targets = run.config["model"]["targets"]
    if targets:
        return f"the model takes its targets (model.targets = {targets!r}), which an export does not"
    cpu = torch.device("cpu")
    loss = engine.build_component(run.config, run.plugins, "loss", info=run.info, device=cpu)
    if isinstance(loss, engine.ModelLoss):
        return "the run's loss is the one the model computes, which an export does not"
    return ""


def write_evaluation(result: Mapping[str, Any]) -> Path:
    """`result` as ``runs/<name>/evaluations/<data file stem>-<which>.json``."""
    folder = engine.runs.folder(Path(result["run"]), EVALUATIONS)  # a real folder of the run, not a link out
    path = folder / f"{Path(result['data']).stem}-{result['which']}.json"
    try:
        engine.runs.write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise engine.TrainingError(f"cannot write '{path}': {engine.one_line(error)}") from None
    return path
