"""A run's directory: its layout, its exclusive creation, and files written so that no fault
leaves one half-written.

    runs/<name>/
        config.toml      the resolved config, with what was inferred from the data; reruns as a job
        metrics.jsonl    one JSON line per logging point
        summary.json     "running" from the start, then "completed", "failed" or "interrupted"
        model.pt         the final weights (a completed or interrupted run)
        checkpoints/     step-<step>.pt (the latest few), best-<step>.pt (the best few), best.json

Whole files are written to a temporary name in the same directory, fsynced, renamed over the
target, and the directory fsynced: a reader sees the old file or the new one. Checkpoints and
models are dicts of tensors and plain values, read with ``torch.load(weights_only=True)``, so
opening one cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, one_line

CONFIG, METRICS, SUMMARY, MODEL, CHECKPOINTS = "config.toml", "metrics.jsonl", "summary.json", "model.pt", "checkpoints"
BEST_INDEX = "best.json"  # in checkpoints/: the best checkpoints, best first, with their metric
MODEL_FORMAT = "engine.model/1"
CHECKPOINT_FORMAT = "engine.checkpoint/1"
_NUMBERED = re.compile(r"(step|best)-(\d+)\.pt")
# Temporary files being written now: a second signal removes them before the process exits.
IN_FLIGHT: set[Path] = set()
_UMASK = os.umask(0o022)  # read it (only os.umask can), then put it back
os.umask(_UMASK)


def valid_run_name(name: str) -> bool:
    """One plain path component: no separator, not `.` or `..`, no leading dot or dash."""
    return bool(name) and re.fullmatch(r"[\w][\w.+=@-]*", name) is not None and len(name) <= 200


def create(runs_dir: str | Path, run_name: str) -> Path:
    """Create the run's directory exclusively: a named run that exists is a ConfigError; an
    unnamed run takes a timestamp, with a suffix when another run took it first."""
    parent = Path(runs_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"runs_dir: cannot create '{parent}': {one_line(error)}") from None
    if run_name:
        path = parent / run_name
        try:
            path.mkdir()
        except FileExistsError:
            raise ConfigError(_taken(path)) from None
        return path
    stem = time.strftime("%Y%m%d-%H%M%S")
    for suffix in range(1, 10_000):
        path = parent / (stem if suffix == 1 else f"{stem}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"runs_dir: no free run name for {stem!r} in '{parent}'")


def check_free(runs_dir: str | Path, run_name: str) -> None:
    """A ConfigError if the named run exists already (`create` checks again, atomically)."""
    if run_name and (Path(runs_dir) / run_name).exists():
        raise ConfigError(_taken(Path(runs_dir) / run_name))


def _taken(path: Path) -> str:
    return f"run {path.name!r} exists: use --resume {path} or another run_name"


def fsync_directory(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write; renamed over `path` when the block succeeds, removed if not."""
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(descriptor, 0o666 & ~_UMASK)  # mkstemp makes it private; the file is the run's, like any other
    os.close(descriptor)
    temporary = Path(name)
    IN_FLIGHT.add(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        IN_FLIGHT.discard(temporary)
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        torch.save(obj, temporary)


def load(path: Path, expected_format: str) -> dict[str, Any]:
    """A checkpoint or model file, read without running code; a ConfigError naming the file if it
    is not one."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"file '{path}' does not exist") from None
    except Exception as error:
        raise ConfigError(f"file '{path}' is not a readable {expected_format} file: {one_line(error)}") from None
    if not isinstance(loaded, dict) or loaded.get("format") != expected_format:
        raise ConfigError(f"file '{path}' is not a {expected_format} file")
    return loaded


def remove_in_flight() -> None:
    """Remove the temporary files being written now (before an immediate exit)."""
    for temporary in list(IN_FLIGHT):
        with contextlib.suppress(OSError):
            temporary.unlink()


def numbered(run_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """The run's checkpoints of `kind` ("step" or "best") as (step, path), oldest first."""
    found = []
    for path in (run_dir / CHECKPOINTS).glob(f"{kind}-*.pt"):
        match = _NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(2)), path))
    return sorted(found)


def checkpoint_path(run_dir: Path, kind: str, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{kind}-{step:09d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = numbered(run_dir, "step")
    return found[-1][1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint by the monitored metric: first in checkpoints/best.json's ranking."""
    index = run_dir / CHECKPOINTS / BEST_INDEX
    try:
        ranking = json.loads(index.read_text(encoding="utf-8"))["ranking"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"file '{index}' cannot be read: {one_line(error)}") from None
    return run_dir / CHECKPOINTS / ranking[0]["file"] if ranking else None


def model_file(run_dir: Path, which: str) -> tuple[Path, str]:
    """The file holding the weights `which` names ("final", "best", "last"), and its format."""
    if which == "final":
        path = run_dir / MODEL
        if not path.is_file():
            raise ConfigError(
                f"run '{run_dir}' has no {MODEL}: it did not complete or stop cleanly (its latest checkpoint: "
                "which='last', on the command line --which last)"
            )
        return path, MODEL_FORMAT
    found = {"best": best_checkpoint, "last": latest_checkpoint}.get(which)
    if found is None:
        raise ConfigError(f"which: expected 'final', 'best' or 'last', got {which!r}")
    path = found(run_dir)
    if path is None:
        raise ConfigError(f"run '{run_dir}' has no {which} checkpoint")
    return path, CHECKPOINT_FORMAT
