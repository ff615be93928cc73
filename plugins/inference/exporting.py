"""Export a run's model: trace it once with ``torch.export`` (the batch dimension dynamic), let
the format write its file, load the file back and check it against the eager model, and record
the check beside it.

    runs/<name>/exports/<which>-<format><suffix>        the exported model
    runs/<name>/exports/<which>-<format><suffix>.json   what it was exported from and how it was checked
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import engine

EXPORTS = "exports"  # in the run directory: what `export` and `--backend auto` write
# Batch sizes an exported model is checked at against eager: one sample, an odd size, a large one.
VERIFY_BATCHES = (1, 7, 256)


@dataclass(slots=True)
class Run:
    """A trained run as inference sees it: its config and plugins, what it inferred from its data,
    and the file holding the weights `which` names."""

    run_dir: Path
    config: engine.Config
    plugins: engine.Plugins
    info: engine.DataInfo
    which: str
    weights: Path
    weights_format: str  # engine.runs' format of the weights file: model.pt's or a checkpoint's
    extra: list[Any]  # plugins beyond the run's own (--plugin), for every config built from it
    blocked: list[str]

    @classmethod
    def open(
        cls, run_dir: str | Path, which: str = "final", plugins: Iterable[Any] = (), blocked: Iterable[str] = ()
    ) -> Run:
        run_dir, plugins, blocked = Path(run_dir), list(plugins), list(blocked)
        config, found, info = engine.open_run(run_dir, plugins, blocked)
        weights, weights_format = engine.model_file(found, run_dir, which)
        return cls(run_dir, config, found, info, which, weights, weights_format, plugins, blocked)

    def load_config(
        self, job: Any = None, overrides: Sequence[str] = (), plugins: Iterable[Any] = ()
    ) -> tuple[engine.Config, engine.Plugins]:
        """A config built from the run's (or `job`), with this run's plugins and `overrides`."""
        job = self.run_dir / engine.runs.CONFIG if job is None else job
        return engine.load_config(job, overrides, [*self.extra, *plugins], self.blocked)

    def module(self) -> torch.nn.Module:
        """The trained model, built with this run's plugins (`--plugin`, `--block`), returning its
        output as the run took it (``[model] output``: a tuple's logits)."""
        module = engine.trained_module(self.config, self.plugins, self.info, self.weights, self.weights_format)
        spec = self.config["model"]["output"]
        return Picked(module, spec).eval() if spec else module

    def inputs(self) -> torch.Tensor:
        """A few inputs of the kind the model takes: the run's own (a sample of its training data,
        read again), or where that data cannot be read any more, token ids of its vocabulary for a
        sequence task and N(0, 1) features otherwise."""
        config, found, cpu = self.config, self.plugins, torch.device("cpu")
        try:
            data = engine.build_component(
                config, found, "data", seed=config["seed"], device=cpu, inferred=config["inferred"]
            )
            loaders = found.hook.build_loaders(
                data=data, config=config, seed=config["seed"], device=cpu, rank=0, world_size=1
            )
        except (engine.ConfigError, OSError):
            generator = torch.Generator().manual_seed(0)
            shape = (8, *(self.info.input_shape or (self.info.n_features,)))
            if self.info.task == "sequence":
                return torch.randint(0, self.info.n_outputs, shape, generator=generator)
            return torch.randn(shape, generator=generator)
        try:
            x = loaders.sample().x
        finally:
            loaders.close()
        if isinstance(x, Mapping):
            raise engine.ConfigError(
                f"the model takes a dict of inputs ({', '.join(x)}); an export takes one tensor: serve it eagerly"
            )
        return x.contiguous()

    def fingerprint(self) -> str:
        """The sha256 of the config and the weights: an export of other weights is stale."""
        digest = hashlib.sha256()
        # A sharded checkpoint is a directory: its files, in order of name.
        weights = sorted(self.weights.iterdir()) if self.weights.is_dir() else [self.weights]
        for path in (self.run_dir / engine.runs.CONFIG, *weights):
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def export_path(self, name: str, suffix: str) -> Path:
        return self.run_dir / EXPORTS / f"{self.which}-{name}{suffix}"


class Picked(torch.nn.Module):
    """A model whose logits are in what it returns (``[model] output``: a tuple's, a dict's), as
    exports and backends serve it: returning them alone."""

    def __init__(self, module: torch.nn.Module, spec: str) -> None:
        super().__init__()
        self.module, self.pick = module, engine.output_of(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.module(x))


def export_format(run: Run, name: str, overrides: Sequence[str] = ()) -> engine.ExportFormat:
    """The export component `name`, with its settings from the run's ``[export]`` section and `overrides`."""
    table = run.plugins.components.get("export", {})
    if name not in table:
        raise engine.ConfigError(f"--format: unknown export format {name!r}{engine.suggest(name, table)}")
    config, found = run.load_config(overrides=[f"export.name={name}", *overrides])
    return engine.build_component(config, found, "export")


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
    path = Path(out) if out is not None else run.export_path(format, chosen.suffix)
    if not path.name.endswith(chosen.suffix):
        raise engine.ConfigError(f"--out: a {format} file's name ends with {chosen.suffix!r}, got '{path}'")
    return write_export(run, format, chosen, path)


def write_export(run: Run, name: str, chosen: engine.ExportFormat, path: Path) -> ExportReport:
    missing = chosen.missing()
    if missing:
        raise engine.ConfigError(f"export {name}: {missing}")
    module = run.module()
    inputs = run.inputs()
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written and checked in a folder beside the target, then renamed over it: a format may insist
    # on the file's suffix (AOTInductor does), so the usual temporary name will not do.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        example = batch_of(inputs, 2)
        what = f"export {name}: model {run.config['model']['name']!r} ({type(module).__name__})"
        try:
            with quiet_torch():
                chosen.write(trace(module, example), example, staged)
        except engine.ConfigError as error:
            raise engine.ConfigError(f"{what}: {error}") from error
        except Exception as error:
            raise engine.TrainingError(f"{what}: {engine.one_line(error)}") from error
        verified = verify(module, chosen.load(staged), chosen, name, inputs)
        staged.replace(path)
        engine.runs.fsync_directory(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {"format": name, "run": str(run.run_dir), "which": run.which, "weights": str(run.weights)}
    record.update(fingerprint=run.fingerprint(), verified=verified, torch=torch.__version__)
    engine.runs.write_text(record_path(path), json.dumps(record, indent=2) + "\n")
    return ExportReport(name, path, verified, time.perf_counter() - started)


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def trace(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of `module` on `example` with a dynamic first (batch) dimension: what every
    format writes. A model torch.export cannot trace (control flow that depends on the data, a
    batch size fixed in its code) is a ConfigError naming torch's reason and the line of the
    model's code that raised it."""
    batch = torch.export.Dim("batch", min=1)
    with quiet_torch():
        try:
            return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as error:
            raise engine.ConfigError(f"torch.export cannot trace it{_where(error)}: {_reason(error)}") from error


def batch_of(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of `size` of the run's inputs, their rows repeated as needed."""
    return inputs[torch.arange(size) % len(inputs)].contiguous()


def verify(
    module: torch.nn.Module, runner: engine.Runner, chosen: engine.ExportFormat, name: str, inputs: torch.Tensor
) -> dict[str, Any]:
    """Run `runner` and the eager `module` on the same batches of the run's `inputs` (`Run.inputs`),
    of each size in VERIFY_BATCHES (up to the format's `max_batch`); a TrainingError if any output
    differs by more than the format's tolerance."""
    tolerance, worst = chosen.tolerance, 0.0
    sizes = [size for size in VERIFY_BATCHES if chosen.max_batch is None or size <= chosen.max_batch]
    for size in sizes:
        x = batch_of(inputs, size)
        with torch.inference_mode():
            expected = module(x)
        got = runner(x).detach()
        if got.shape != expected.shape:
            raise engine.TrainingError(
                f"export {name}: the file's model returns shape {tuple(got.shape)} at batch {size}, "
                f"eager {tuple(expected.shape)}; nothing written"
            )
        difference = (got.float() - expected).abs()
        worst = max(worst, float(difference.max()))
        if bool((difference > tolerance + tolerance * expected.abs()).any()):
            raise engine.TrainingError(
                f"export {name}: the file's model differs from eager by {float(difference.max()):.3g} at "
                f"batch {size} (tolerance {tolerance:g}); nothing written"
            )
    return {"batch_sizes": sizes, "max_abs_diff": worst, "tolerance": tolerance}


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
