"""A run's directory: the files the core writes there, its exclusive creation, and atomic writes
that no fault leaves half-written.

    runs/<name>/
        config.toml      the resolved config, with what was inferred from the data; reruns as a job
        summary.json     "running" from the start, then "completed", "failed" or "interrupted", or
                         the status a plugin stopped the run with (State.stop_status: "pruned")
        model.pt         the final model (a completed or interrupted run), from the final_model chain

Plugins own the rest, each its own files (the checkpoint plugin ``checkpoints/``, the metrics file
plugin ``metrics.jsonl``), and write them with the helpers here.

Whole files are written to a temporary name in the same directory, fsynced, renamed over the
target, and the directory fsynced: a reader sees the old file or the new one. Checkpoints and
models are dicts of tensors and plain values, read with ``torch.load(weights_only=True)``, so
opening one cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, one_line

CONFIG, SUMMARY, MODEL = "config.toml", "summary.json", "model.pt"
MODEL_FORMAT = "engine.model/2"
CHECKPOINT_FORMAT = "engine.checkpoint/2"
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


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The whole JSON lines of a file written a line at a time (a killed writer may have cut its
    last one); none when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            break
    return lines


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    """`values` as strict JSON, atomically: a non-finite number becomes null and is named under
    ``"non_finite"``."""
    bad = [key for key, value in values.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        values = {**{key: None if key in bad else value for key, value in values.items()}, "non_finite": bad}
    write_text(path, json.dumps(values, indent=2, allow_nan=False) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json (`Trainer.summary` writes it), or {} when it has none or it is unreadable."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def inside(run_dir: Path, path: Path, what: str) -> Path:
    """`path` if it lies inside `run_dir` once links are resolved; else a ConfigError naming `what`."""
    resolved, root = path.resolve(), run_dir.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{what} '{path}' is outside run '{run_dir}'")
    return path
