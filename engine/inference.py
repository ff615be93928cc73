"""After training: export a run's model, and run it on new data (`predict`) or labelled data
(`evaluate`), on eager PyTorch or on an exported format.

Everything starts from `engine.load`'s module: the complete inference model for raw input
features, in eval mode, on the CPU. Export formats are components of the kind ``export``
(:class:`engine.types.ExportFormat`); the core names none of them. What a format writes is loaded
back and checked against the eager model before it is reported as written, and a verified file
can serve `predict` and `evaluate` as a backend:

    runs/<name>/exports/<which>-<format><suffix>        the exported model
    runs/<name>/exports/<which>-<format><suffix>.json   what it was exported from and how it was checked

Files to read or write are handled by components named after the file's suffix: a ``data``
component (``path``, ``val_path``) reads inputs and labels with the checks training applies, and
a ``predictions`` component writes what `predict` returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import runs
from .config import CORE_KINDS, Config, load_config
from .errors import ConfigError, TrainingError, one_line, suggest
from .hookspecs import hookimpl
from .loop import Trainer, build_component, open_run, trained_module
from .plugins import Plugins
from .schema import settings_of
from .types import DataInfo, ExportFormat, Runner

EXPORTS = "exports"  # in the run directory: what `export` and `--backend auto` write
EVALUATIONS = "evaluations"  # in the run directory: what `evaluate` writes
# Batch sizes an exported model is checked at against eager: one sample, an odd size, a large one.
VERIFY_BATCHES = (1, 7, 256)
EAGER = "eager"


# --- tracing ------------------------------------------------------------------------------------


def export_program(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of `module` on `example` with a dynamic first (batch) dimension: the base
    every export format builds on. A model torch.export cannot trace (control flow that depends on
    the data, a batch size fixed in its code) is a ConfigError naming torch's reason and the line
    of the model's code that raised it."""
    batch = torch.export.Dim("batch", min=1)
    with quiet_torch():
        try:
            return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as error:
            raise ConfigError(f"torch.export cannot trace it{_where(error)}: {_reason(error)}") from error


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Warnings, log records below ERROR and what torch prints to stderr silenced: a failed trace
    prints its partial graph (torch/export/_trace.py), the ONNX exporter logs the optional
    packages it skips, and an export's outcome is reported by its check or its one-line error."""
    # torch's loggers set their own levels (torch._logging), so a parent's level does not reach them.
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _where(error: BaseException) -> str:
    """`` at file:line in forward (`code`)``: the innermost frame outside torch, or nothing."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(torch_dir)]
    frames = [frame for frame in frames if frame.filename != __file__]
    if not frames:
        return ""
    frame = frames[-1]
    code = f" (`{frame.line}`)" if frame.line else ""
    return f" at {frame.filename}:{frame.lineno} in {frame.name}{code}"


def _reason(error: BaseException) -> str:
    """torch's reason in one line: its first line, or the line that names the violated constraint."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    for line in lines:
        if line.startswith("- You marked batch as dynamic"):  # "...specialized it to be a constant (8)"
            return line.removeprefix("- ").split(". ")[0]
    return lines[0]


# --- the run ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """A trained run as inference sees it: its config and plugins, what it inferred from its data,
    and the file holding the weights `which` names."""

    run_dir: Path
    config: Config
    plugins: Plugins
    info: DataInfo
    which: str
    weights: Path
    weights_format: str  # engine.runs' format of the weights file: model.pt's or a checkpoint's
    extra: list[Any]  # plugins beyond the run's own (--plugin), for every config built from it
    blocked: list[str]

    @classmethod
    def open(
        cls, run_dir: str | Path, which: str = "final", plugins: Iterable[Any] = (), blocked: Iterable[str] = ()
    ) -> Run:
        run_dir = Path(run_dir)
        plugins, blocked = list(plugins), list(blocked)
        config, found, info = open_run(run_dir, plugins, blocked)
        weights, weights_format = runs.model_file(run_dir, which)
        return cls(run_dir, config, found, info, which, weights, weights_format, plugins, blocked)

    def load_config(
        self, job: Any = None, overrides: Sequence[str] = (), plugins: Iterable[Any] = ()
    ) -> tuple[Config, Plugins]:
        """A config built from the run's (or `job`), with this run's plugins and `overrides`."""
        job = self.run_dir / runs.CONFIG if job is None else job
        return load_config(job, overrides, [*self.extra, *plugins], self.blocked)

    def module(self) -> torch.nn.Module:
        """The trained model, built with this run's plugins (`--plugin`, `--block`)."""
        return trained_module(self.config, self.plugins, self.info, self.weights, self.weights_format)

    def fingerprint(self) -> str:
        """The sha256 of the config and the weights: an export of other weights is stale."""
        digest = hashlib.sha256()
        for path in (self.run_dir / runs.CONFIG, self.weights):
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def default_export_path(self, name: str, suffix: str) -> Path:
        return self.run_dir / EXPORTS / f"{self.which}-{name}{suffix}"


def export_format(run: Run, name: str, overrides: Sequence[str] = ()) -> ExportFormat:
    """The export component `name`, with its settings from the run's ``[export]`` section and `overrides`."""
    table = run.plugins.components.get("export", {})
    if name not in table:
        raise ConfigError(f"--format: unknown export format {name!r}{suggest(name, table)}")
    config, found = run.load_config(overrides=[f"export.name={name}", *overrides])
    return build_component(config, found, "export")


# --- export -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ExportReport:
    """What `export` wrote: the file, and how it was checked against the eager model."""

    format: str
    path: Path
    verified: dict[str, Any]
    seconds: float

    def describe(self) -> str:
        check = self.verified
        batches = ", ".join(str(size) for size in check["batch_sizes"])
        return (
            f"{self.format} written to {self.path} (checked against eager at batch {batches}: "
            f"max |diff| {check['max_abs_diff']:.3g}, tolerance {check['tolerance']:g}; {self.seconds:.1f} s)"
        )


def export(
    run_dir: str | Path,
    format: str,
    *,
    out: str | Path | None = None,
    which: str = "final",
    overrides: Sequence[str] = (),
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
) -> ExportReport:
    """Export a run's model to `format` (an ``export`` component), check it against the eager model
    and write it to `out` (default: ``runs/<name>/exports/<which>-<format><suffix>``) with its
    record beside it (``<file>.json``). Nothing is written at `out` unless the check passes."""
    run = Run.open(run_dir, which, plugins, blocked)
    chosen = export_format(run, format, overrides)
    path = Path(out) if out is not None else run.default_export_path(format, chosen.suffix)
    if not path.name.endswith(chosen.suffix):
        raise ConfigError(f"--out: a {format} file's name ends with {chosen.suffix!r}, got '{path}'")
    return _export(run, format, chosen, path)


def _export(run: Run, name: str, chosen: ExportFormat, path: Path) -> ExportReport:
    missing = chosen.missing()
    if missing:
        raise ConfigError(f"export {name}: {missing}")
    module = run.module()
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked in a folder beside the target, then renamed over it: a format may insist
    # on the file's suffix (AOTInductor does), so the usual temporary name will not do.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        example = torch.randn(2, run.info.n_features, generator=torch.Generator().manual_seed(0))
        try:
            with quiet_torch():
                chosen.write(module, example, staged)
        except ConfigError as error:
            raise ConfigError(f"export {name}: model {_model_name(run, module)}: {error}") from error
        except Exception as error:
            raise TrainingError(f"export {name}: model {_model_name(run, module)}: {one_line(error)}") from error
        verified = verify(module, chosen.load(staged), chosen, name, run.info.n_features)
        staged.replace(path)
        runs.fsync_directory(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {
        "format": name,
        "run": str(run.run_dir),
        "which": run.which,
        "weights": str(run.weights),
        "fingerprint": run.fingerprint(),
        "verified": verified,
        "torch": torch.__version__,
    }
    runs.write_text(_record_path(path), json.dumps(record, indent=2) + "\n")
    return ExportReport(name, path, verified, time.perf_counter() - started)


def _model_name(run: Run, module: torch.nn.Module) -> str:
    return f"{run.config['model']['name']!r} ({type(module).__name__})"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def verify(module: torch.nn.Module, runner: Runner, chosen: ExportFormat, name: str, n_features: int) -> dict[str, Any]:
    """Run `runner` and the eager `module` on the same random batches of each size in
    VERIFY_BATCHES; a TrainingError if any output differs by more than the format's tolerance."""
    generator = torch.Generator().manual_seed(0)
    tolerance = chosen.tolerance
    worst = 0.0
    largest = getattr(chosen, "max_batch", None)  # a format built for batches up to a size
    sizes = [size for size in VERIFY_BATCHES if largest is None or size <= largest]
    for size in sizes:
        x = torch.randn(size, n_features, generator=generator)
        with torch.inference_mode():
            expected = module(x)
        got = runner(x).detach()
        if got.shape != expected.shape:
            raise TrainingError(
                f"export {name}: the file's model returns shape {tuple(got.shape)} at batch {size}, "
                f"eager {tuple(expected.shape)}; nothing written"
            )
        difference = (got.float() - expected).abs()
        worst = max(worst, float(difference.max()))
        if bool((difference > tolerance + tolerance * expected.abs()).any()):
            raise TrainingError(
                f"export {name}: the file's model differs from eager by {float(difference.max()):.3g} at "
                f"batch {size} (tolerance {tolerance:g}); nothing written"
            )
    return {"batch_sizes": sizes, "max_abs_diff": worst, "tolerance": tolerance}


# --- backends -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Backend:
    """A run's model ready to run: eager, or a verified export loaded back."""

    name: str
    run: Runner
    info: DataInfo
    description: str  # one line: which backend, from which file, and why

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def backend_names(plugins: Plugins) -> list[str]:
    return ["auto", EAGER, *sorted(plugins.components.get("export", {}))]


def load_backend(
    run_dir: str | Path,
    which: str = "final",
    backend: str = "auto",
    *,
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
) -> Backend:
    """A run's model on `backend`: ``eager``, an export format, or ``auto``.

    A format uses its verified export in the run's ``exports/`` folder, exporting it first when
    there is none for these weights. ``auto`` tries the formats this machine can run in their
    `auto_rank` order and takes the first that exports and verifies; else eager.
    """
    return _load_backend(Run.open(run_dir, which, plugins, blocked), backend)


def _load_backend(run: Run, backend: str) -> Backend:
    names = backend_names(run.plugins)
    if backend not in names:
        raise ConfigError(f"--backend: unknown backend {backend!r}{suggest(backend, names)}")
    if backend == EAGER:
        return _eager(run, "eager (asked for)")
    if backend != "auto":
        return _export_backend(run, backend, export_format(run, backend))
    skipped = []
    ranked = []
    for name in run.plugins.components.get("export", {}):
        chosen = export_format(run, name)
        if chosen.auto_rank is not None:
            ranked.append((chosen.auto_rank, name, chosen))
    for _, name, chosen in sorted(ranked, key=lambda item: -item[0]):
        missing = chosen.missing()
        if missing:
            skipped.append(f"{name}: {missing}")
            continue
        try:
            return _export_backend(run, name, chosen, auto=True)
        except (ConfigError, TrainingError, OSError) as error:
            skipped.append(f"{name}: {error}")
    return _eager(run, "eager (auto; " + ("; ".join(skipped) or "no export format can serve") + ")")


def _eager(run: Run, description: str) -> Backend:
    module = run.module()

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return Backend(EAGER, eager, run.info, description)


def _export_backend(run: Run, name: str, chosen: ExportFormat, auto: bool = False) -> Backend:
    missing = chosen.missing()
    if missing:
        raise ConfigError(f"--backend {name}: {missing}")
    path = run.default_export_path(name, chosen.suffix)
    how = "auto" if auto else "asked for"
    if _verified(path, run):
        return Backend(name, chosen.load(path), run.info, f"{name} ({how}; verified export {path})")
    report = _export(run, name, chosen, path)
    return Backend(name, chosen.load(path), run.info, f"{name} ({how}; {report.describe()})")


def _verified(path: Path, run: Run) -> bool:
    """Whether `path` holds an export of these weights that passed its check."""
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return path.is_file() and record.get("fingerprint") == run.fingerprint()


# --- predict ------------------------------------------------------------------------------------


def predictions(backend: Backend, x: Any, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """The backend's predictions for the inputs `x` ([N, n_features], array or tensor), in batches:
    ``class`` (indices) and ``probability`` ([N, classes]) for classification, ``class`` (0 or 1)
    and ``probability`` ([N], of class 1) for binary labels, ``value`` for regression."""
    info = backend.info
    x, width = inputs(x, info.n_features)
    if width != info.n_features:
        raise ConfigError(f"inputs have {width} features per sample, but the model was trained on {info.n_features}")
    outputs = torch.cat([backend(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]).detach()
    if info.task == "classification":
        # softmax turns logits into probabilities, and leaves log-probabilities' exp unchanged
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
) -> dict[str, torch.Tensor]:
    """A run's predictions for the inputs `x` (see `predictions`), on `backend` (see `load_backend`)."""
    return predictions(load_backend(run_dir, which, backend, plugins=plugins), x, batch_size)


def read_inputs(run: Run, file: str | Path, overrides: Sequence[str] = ()) -> torch.Tensor:
    """The inputs of a data file, read by the data component named after its suffix (without
    labels where the component can do without), checked against the run's input width."""
    config, found = _data_file_config(run, Path(file), overrides, labelled=False)
    data = build_component(config, found, "data", seed=config["seed"], device=torch.device("cpu"), labelled=False)
    x, width = inputs(data[0] if isinstance(data, tuple) else data, run.info.n_features)
    if width != run.info.n_features:
        raise _wrong_width(file, width, run)
    return x


def inputs(x: Any, n_features: int) -> tuple[torch.Tensor, int]:
    """`x` (an array or tensor) as a float32 CPU tensor of samples, one feature a column when the
    model takes one; and its features per sample, for the caller to check (1 for a flat array: a
    value per sample; 0 for a single number)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()
    if x.dim() == 1 and n_features == 1:
        x = x[:, None]
    return x, x.shape[-1] if x.dim() > 1 else x.dim()


def _wrong_width(file: str | Path, width: int, run: Run) -> ConfigError:
    trained, run_dir = run.info.n_features, run.run_dir
    return ConfigError(f"--data '{file}': {width} features per sample, but run '{run_dir}' was trained on {trained}")


def write_predictions(run: Run, columns: Mapping[str, torch.Tensor], out: str | Path, overrides: Sequence[str] = ()):
    """Write `columns` with the ``predictions`` component named after `out`'s suffix."""
    out = Path(out)
    name = _suffix(out, "--out")
    table = run.plugins.components.get("predictions", {})
    if name not in table:
        raise ConfigError(f"--out '{out}': no predictions component writes .{name} files{suggest(name, table)}")
    config, found = run.load_config(overrides=[f"predictions.name={name}", *overrides])
    writer = build_component(config, found, "predictions")
    writer(out, {key: value.numpy() for key, value in columns.items()})


def _suffix(path: Path, option: str) -> str:
    if not path.suffix:
        raise ConfigError(
            f"{option} '{path}': the file name needs a suffix: it names the component that handles the file"
        )
    return path.suffix.lstrip(".").lower()


def _data_file_config(
    run: Run,
    file: Path,
    overrides: Sequence[str],
    labelled: bool,
    changes: Mapping[str, Any] | None = None,
    plugins: Iterable[Any] = (),
) -> tuple[Config, Plugins]:
    """The run's config with ``[data]`` reading `file`: the data component named after its suffix,
    with the run's own settings for it when the run used the same one, and the run's batching;
    `changes` replace top-level keys or sections."""
    if not file.is_file():
        raise ConfigError(f"--data: file '{file}' does not exist")
    reader = _suffix(file, "--data")
    table = run.plugins.components.get("data", {})
    if reader not in table:
        raise ConfigError(f"--data '{file}': no data component reads .{reader} files{suggest(reader, table)}")
    params = settings_of(table[reader].factory, f"data {reader!r}", CORE_KINDS["data"])
    if "path" not in params:
        raise ConfigError(f"--data '{file}': data component {reader!r} reads no files (it has no setting 'path')")
    job = run.config.to_dict()
    old = run.config["data"]
    data = {key: value for key, value in old.items() if key not in old.params and key != "name"}
    if old["name"] == reader:
        data.update(old.component_settings())
    data.update(name=reader, path=str(file.absolute()))
    if "val_path" in params:
        data["val_path"] = str(file.absolute()) if labelled else ""
    if "test_path" in params:
        data["test_path"] = ""
    if data.get("task") == "auto":  # the run's task, not a guess from this file's few rows
        data["task"] = run.info.task
    # The whole file, raw: the saved model standardizes its inputs itself (engine.load).
    data.update({key: value for key, value in (("standardize", False), ("test_fraction", 0.0)) if key in data})
    job["data"] = data
    job.update(changes or {})
    return run.load_config(job, overrides, plugins)


# --- evaluate -----------------------------------------------------------------------------------


class _EvaluationData:
    """Checks the evaluation file against the run and gives the trainer the run's DataInfo, so that
    the loss and metrics are built as they were for the run (a file holding some classes only
    still has the run's class count)."""

    def __init__(self, run: Run, file: Path) -> None:
        self.run, self.file = run, file

    @hookimpl(wrapper=True)
    def build_loaders(self) -> Iterator[None]:
        loaders = yield
        found, info, run = loaders.info, self.run.info, self.run
        where = f"--data '{self.file}'"
        if found.n_features != info.n_features:
            raise _wrong_width(self.file, found.n_features, run)
        if found.task != info.task:
            raise ConfigError(f"{where}: its labels are for {found.task}, but run '{run.run_dir}' did {info.task}")
        if info.task == "classification" and found.n_outputs > info.n_outputs:
            raise ConfigError(
                f"{where}: has class index {found.n_outputs - 1}, but run '{run.run_dir}' has {info.n_outputs} classes"
            )
        if info.task == "regression" and found.n_outputs != info.n_outputs:
            raise ConfigError(
                f"{where}: {found.n_outputs} target columns, but run '{run.run_dir}' predicts {info.n_outputs}"
            )
        loaders.info = replace(info, n_train=found.n_train, n_val=found.n_val)  # the run's classes and sizes
        return loaders


class _Runs(torch.nn.Module):
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
) -> dict[str, Any]:
    """The loss terms and metrics of a run's model on a labelled data file, by the run's own
    validation: a Trainer built from the run's config (nothing is written, nothing trained) with
    the file as its validation data and `backend` as the model. On the run's validation data it
    gives the run's final validation figures. A figure that is not finite (the model's outputs
    overflow on this data) is None, and named in ``not_finite``."""
    run = Run.open(run_dir, which, plugins, blocked)
    file = Path(data)
    # On the CPU, where the backends run; no accelerate component: the train step is never called.
    changes = {"device": "cpu", "accelerate": {"name": None}}
    config, found = _data_file_config(run, file, overrides, True, changes, [_EvaluationData(run, file)])
    chosen = backend if isinstance(backend, Backend) else _load_backend(run, backend)
    trainer = Trainer(config, found)
    try:
        # compute_loss hooks (a regularizer) read the trained weights from the trainer's module.
        trainer.module.load_state_dict(runs.load(run.weights, run.weights_format)["model"])
        trainer.model = _Runs(chosen)
        metrics = trainer.validate()
    finally:
        trainer.loaders.close()
    result: dict[str, Any] = {
        "run": str(run.run_dir),
        "which": which,
        "data": str(file),
        "samples": trainer.info.n_val,
        "backend": chosen.name,
    }
    result.update({name.removeprefix("val_"): value for name, value in metrics.items()})
    not_finite = [name for name, value in result.items() if isinstance(value, float) and not math.isfinite(value)]
    if not_finite:  # JSON has no inf or nan
        result.update(dict.fromkeys(not_finite), not_finite=not_finite)
    return result


def write_evaluation(result: Mapping[str, Any]) -> Path:
    """`result` as ``runs/<name>/evaluations/<data file stem>-<which>.json``."""
    path = Path(result["run"]) / EVALUATIONS / f"{Path(result['data']).stem}-{result['which']}.json"
    path.parent.mkdir(exist_ok=True)
    runs.write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path
