"""Export a run's model: trace it once with ``torch.export`` (the batch dimension dynamic), let
the format write its file, load the file back and check it against the eager model, and record
the check beside it, with the file's content hash.

    runs/<name>/exports/<which>-<format><suffix>        the exported model
    runs/<name>/exports/<which>-<format><suffix>.json   what it was exported from, how it was
                                                        checked, and its sha256

An export is used later only under that hash, loaded from a private copy whose bytes were hashed
(`load_verified`): a file swapped or damaged after its check is not the file that was checked. A
format whose file may run code when loaded (`engine.ExportFormat.runs_code`: AOTInductor's shared
library, a torch.export program) is loaded only from a run the user trusts, or when this machine
verified that very file: its hash is kept in the user's cache (`vouch`), outside any run directory,
since a run received from elsewhere brings its own records. Every load runs with torch.load forced
to ``weights_only`` (`weights_only_loads`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
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
    trust: bool  # the user trusts the run: its config may import code, its exports may hold code

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        which: str = "final",
        plugins: Iterable[Any] = (),
        blocked: Iterable[str] = (),
        trust: bool = False,
    ) -> Run:
        run_dir, plugins, blocked = Path(run_dir), list(plugins), list(blocked)
        config, found, info = engine.open_run(run_dir, plugins, blocked, trust=trust)
        weights, weights_format = engine.model_file(found, run_dir, which)
        return cls(run_dir, config, found, info, which, weights, weights_format, plugins, blocked, trust)

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

    def may_load(self, chosen: engine.ExportFormat, sha256: str) -> bool:
        """Whether the verified export with this hash may be loaded: a file that may run code only
        from a trusted run, or when this machine verified it."""
        return not getattr(chosen, "runs_code", True) or self.trust or vouched(sha256)


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
    sha256: str

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
    trust: bool = False,
) -> ExportReport:
    """Export a run's model to `format` (an ``export`` component), check it against the eager model
    and write it to `out` (default: ``runs/<name>/exports/<which>-<format><suffix>``) with its
    record beside it (``<file>.json``). Nothing is written at `out` unless the check passes."""
    out = writable(Path(out), "--out") if out is not None else None
    run = Run.open(run_dir, which, plugins, blocked, trust)
    chosen = export_format(run, format, overrides)
    path = out if out is not None else run.export_path(format, chosen.suffix)
    if not path.name.endswith(chosen.suffix):
        raise engine.ConfigError(f"--out: a {format} file's name ends with {chosen.suffix!r}, got '{path}'")
    return write_export(run, format, chosen, path)[0]


def writable(path: Path, option: str) -> Path:
    """`path` if a file can be written there (a file, in a folder that exists and takes new files),
    checked before any work; else a ConfigError naming `option`."""
    if path.is_dir():
        raise engine.ConfigError(f"{option} '{path}' is a folder: name a file")
    folder = path.parent
    if not folder.is_dir():
        raise engine.ConfigError(f"{option} '{path}': the folder '{folder}' does not exist")
    try:  # what writing will do: a new file beside it (os.access says yes to root, and on read-only mounts)
        descriptor, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise engine.ConfigError(f"{option} '{path}': cannot write in '{folder}': {error.strerror}") from None
    os.close(descriptor)
    os.unlink(probe)
    return path


def write_export(run: Run, name: str, chosen: engine.ExportFormat, path: Path) -> tuple[ExportReport, engine.Runner]:
    """Write, load back and check the export; its report, and the file as loaded for the check."""
    missing = chosen.missing()
    if missing:
        raise engine.ConfigError(f"export {name}: {missing}")
    module = run.module()
    inputs = run.inputs()
    started = time.perf_counter()
    if path.parent == run.run_dir / EXPORTS:
        engine.runs.folder(run.run_dir, EXPORTS)  # a real folder of the run, not a link out of it
    # Written and checked in a folder beside the target, then renamed over it: a format may insist
    # on the file's suffix (AOTInductor does), so the usual temporary name will not do.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    engine.runs.IN_FLIGHT.add(staging)
    try:
        staged = staging / path.name
        write_staged(run, name, chosen, module, batch_of(inputs, 2), staged)
        runner = loaded(chosen, staged, f"export {name}: the file written")
        verified = verify(module, runner, chosen, name, inputs)
        sha256 = file_sha256(staged)
        staged.replace(path)
        engine.runs.fsync_directory(path.parent)
    finally:
        engine.runs.IN_FLIGHT.discard(staging)
        shutil.rmtree(staging, ignore_errors=True)
    record = {"format": name, "run": str(run.run_dir), "which": run.which, "weights": str(run.weights)}
    record.update(sha256=sha256, fingerprint=run.fingerprint(), verified=verified, torch=torch.__version__)
    try:
        engine.runs.write_text(record_path(path), json.dumps(record, indent=2) + "\n")
    except OSError as error:
        raise engine.TrainingError(
            f"export {name}: cannot write {record_path(path)}: {engine.one_line(error)}"
        ) from None
    vouch(sha256)
    return ExportReport(name, path, verified, time.perf_counter() - started, sha256), runner


def write_staged(
    run: Run, name: str, chosen: engine.ExportFormat, module: torch.nn.Module, example: torch.Tensor, staged: Path
) -> None:
    """The format's `write` of the model traced on `example` (inputs of the run's) to `staged`;
    what fails, in one line naming it."""
    what = f"export {name}: model {run.config['model']['name']!r} ({type(module).__name__})"
    try:
        with quiet_torch():
            chosen.write(trace(module, example), example, staged)
    except engine.ConfigError as error:
        raise engine.ConfigError(f"{what}: {error}") from error
    except OSError as error:  # a full disk: the machine's, not the model's
        raise engine.TrainingError(f"export {name}: cannot write '{staged.parent}': {engine.one_line(error)}") from None
    except Exception as error:
        raise engine.TrainingError(f"{what}: {engine.one_line(error)}") from error


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_record(path: Path, run: Run) -> dict[str, Any] | None:
    """The record of an export at `path` of this run's weights that passed its check, or None (no
    record, another run's weights, a record from before content hashes)."""
    record_file = record_path(path)
    if not (path.is_file() and record_file.is_file()):
        return None
    for file in (path, record_file):
        if file.is_relative_to(run.run_dir):
            engine.runs.inside(run.run_dir, file, "export")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    return record if record.get("fingerprint") == run.fingerprint() else None


class Changed(engine.ConfigError):
    """An export whose content is not the content its record verified."""


def load_verified(chosen: engine.ExportFormat, path: Path, sha256: str) -> engine.Runner:
    """The export at `path`, loaded from a private copy whose bytes have the hash `sha256` (the
    one its record verified); `Changed` if they do not."""
    folder = Path(tempfile.mkdtemp(prefix="engine-export-"))  # private to this user (0700)
    try:
        copy = folder / path.name  # the same name: a format may insist on its suffix
        digest = hashlib.sha256()
        with open(path, "rb") as source, open(copy, "wb") as target:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                target.write(block)
        if digest.hexdigest() != sha256:
            raise Changed(f"export '{path}' is not the file its record verified (its content hash differs)")
        return loaded(chosen, copy, f"export '{path}'")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def loaded(chosen: engine.ExportFormat, path: Path, what: str) -> engine.Runner:
    """`chosen.load(path)`, with torch.load held to weights_only; a file it cannot load is a
    ConfigError naming `what`."""
    try:
        with weights_only_loads(), quiet_torch():
            return chosen.load(path)
    except engine.EngineError:
        raise
    except Exception as error:
        raise engine.ConfigError(f"{what} cannot be loaded: {engine.one_line(error)}") from error


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block reads weights only, even where torch asks for more:
    ``torch.export.load`` unpickles a program's weights and constants with ``weights_only=False``
    where the file says so, and falls back to it when the safe load fails (torch/_export/serde/
    serialize.py). torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call."""
    variable = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def vouched_folder() -> Path:
    """Where this machine keeps the hashes of the exports it verified: the user's cache, outside
    every run directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "torch-plugin-engine" / "verified-exports"


def vouch(sha256: str) -> None:
    with contextlib.suppress(OSError):  # an unwritable cache only means exporting again next time
        folder = vouched_folder()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / sha256).touch()


def vouched(sha256: str) -> bool:
    return bool(sha256) and all(c in "0123456789abcdef" for c in sha256) and (vouched_folder() / sha256).is_file()


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
