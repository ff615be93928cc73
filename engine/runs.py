"""A run's directory: the files the core writes there, its exclusive creation, the lock of the
process that owns it, and atomic writes that no fault leaves half-written.

    runs/<name>/
        config.toml      the resolved config, with what was inferred from the data; reruns as a job
        summary.json     "running" from the start, then "completed", "failed" or "interrupted", or
                         the status a plugin stopped the run with (State.stop_status: "pruned")
        model.pt         the final model (a completed or interrupted run), from the final_model chain
        .lock            locked by the process that trains the run (`Lock`)
        .reserve         space kept while the run trains, for its final summary (`reserve`)

Plugins own the rest, each its own files (the checkpoint plugin ``checkpoints/``, the metrics file
plugin ``metrics.jsonl``), and write them with the helpers here: what is written, appended or
deleted stays inside the run (`folder`, `append_only`).

Whole files are written to a temporary name in the same directory, fsynced, renamed over the
target, and the directory fsynced: a reader sees the old file or the new one. Checkpoints and
models are dicts of tensors and plain values, read with ``torch.load(weights_only=True)``, so
opening one cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, one_line

CONFIG, SUMMARY, MODEL = "config.toml", "summary.json", "model.pt"
LOCK, RESERVE = ".lock", ".reserve"
# Room for the final summary.json (a few kB) and its temporary copy, on any file system's blocks.
RESERVED_BYTES = 64 * 1024
MODEL_FORMAT = "engine.model/2"
CHECKPOINT_FORMAT = "engine.checkpoint/3"  # /3: with the run's course (engine/resuming.py)
STATUSES = ("running", "completed", "failed", "interrupted")
# Temporary files (and folders) being written now: an immediate exit removes them first.
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
    # Through a Python file: a failed write (a full disk) is an OSError saying so, where torch's
    # own file writer says "enforce fail at inline_container.cc".
    with replacing(path) as temporary, open(temporary, "wb") as handle:
        torch.save(obj, handle)


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
    """Remove the temporary files (and folders) being written now (before an immediate exit)."""
    for temporary in list(IN_FLIGHT):
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
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


# --- ownership: one process trains a run at a time -------------------------------------------------

# The descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its
# copies, so that a lock goes when its owner dies, not when the last of its children does.
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for descriptor in _HELD:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)
# A probe of the lock (`held`) takes it for microseconds: a run that meets one tries again.
LOCK_TRIES, LOCK_WAIT_S = 50, 0.005


class Lock:
    """This process's hold on a run directory: ``flock`` on its `LOCK` file, which the kernel
    releases when the process ends, however it ends (a SIGKILL leaves no stale lock). The file
    says who holds it (pid and host), for the message of whoever finds it taken."""

    def __init__(self, run_dir: Path) -> None:
        try:
            descriptor = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise ConfigError(f"run '{run_dir}': cannot open its {LOCK}: {one_line(error)}") from None
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(LOCK_WAIT_S)
        else:
            holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
            os.close(descriptor)
            raise in_use(run_dir, holder)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.descriptor: int | None = descriptor
        _HELD.add(descriptor)

    def release(self) -> None:
        if self.descriptor is not None:
            _HELD.discard(self.descriptor)
            os.close(self.descriptor)  # the lock goes with its last descriptor
            self.descriptor = None


def in_use(run_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"run {run_dir.name!r} is in use by {holder or 'another process'} (a run is trained by one process at a time)"
    )


def check_not_held(run_dir: Path) -> None:
    """A ConfigError naming the process that trains the run now, if one does: said before anything
    else is checked of the run (`Lock` is what keeps a second process out)."""
    if held(run_dir):
        with contextlib.suppress(OSError):
            raise in_use(run_dir, (run_dir / LOCK).read_text(encoding="utf-8", errors="replace").strip())
        raise in_use(run_dir, "")


def held(run_dir: Path) -> bool:
    """Whether a process holds the run's lock now (the run is being trained)."""
    try:
        descriptor = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # with it, the shared lock just taken


def reserve(run_dir: Path) -> None:
    """Keep `RESERVED_BYTES` of the disk for the run's final summary (`unreserve` frees them just
    before it is written): a run that fills the disk still says how it ended. A disk without that
    much room is an OSError now, before the run starts; a file size limit (``ulimit -f``) that
    forbids a file this large is not a full disk, and leaves the run without its reserve."""
    descriptor = os.open(run_dir / RESERVE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.posix_fallocate(descriptor, 0, RESERVED_BYTES)
        os.fsync(descriptor)
    except OSError as error:
        os.close(descriptor)
        unreserve(run_dir)
        if error.errno != errno.EFBIG:
            raise
        return
    os.close(descriptor)


def unreserve(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / RESERVE).unlink()


# --- the run's files stay inside it ---------------------------------------------------------------


def folder(run_dir: Path, name: str) -> Path:
    """The run's subfolder `name`, created if it is missing: a real folder, not a link out of the
    run, so that what a plugin writes or deletes there stays inside it."""
    path = run_dir / name
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    if path.is_symlink() or not path.is_dir():
        what = "a link" if path.is_symlink() else "not a folder"
        raise ConfigError(f"'{path}' is {what}: a run's files stay inside it")
    return path


def append_only(path: Path) -> int:
    """A descriptor of `path` to append to (created if missing), refusing a link: a run's file
    written through a link would write outside the run."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigError(f"'{path}' is a link: a run's files stay inside it") from None
        raise
