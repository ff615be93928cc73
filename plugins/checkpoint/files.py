"""The files of ``checkpoints/``: their names, and how they are written whole or not at all.

A checkpoint is one file, ``step-<step>.pt``, or, when the model is sharded, one directory,
``step-<step>.dcp/``; either is written under a temporary name starting with a dot and renamed
when complete, so that a name without the dot is always a whole checkpoint. The best checkpoints
are hard links to them (``best-<step>.pt``, a directory of links ``best-<step>.dcp/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

import engine

runs = engine.runs
FOLDER = "checkpoints"
RANKING = "best.json"  # in checkpoints/: the best checkpoints, best first, with their metric
WHOLE, SHARDED = ".pt", ".dcp"  # a checkpoint file; a directory of shards (torch.distributed.checkpoint)
NUMBERED = re.compile(r"(step|best)-(\d+)(\.pt|\.dcp)")


def numbered(run_dir: Path, kind: str) -> list[tuple[int, Path]]:
    """The run's checkpoints of `kind` ("step" or "best") as (step, path), oldest first."""
    found = []
    for path in (run_dir / FOLDER).glob(f"{kind}-*"):
        match = NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(2)), path))
    return sorted(found)


def checkpoint_path(run_dir: Path, kind: str, step: int, suffix: str = WHOLE) -> Path:
    return run_dir / FOLDER / f"{kind}-{step:09d}{suffix}"


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is whole: the same name on every process."""
    return path.with_name(f".{path.name}.tmp")


def own_name(name: Any, source: Any) -> str:
    """`name` if it names a checkpoint of the folder (``best-<step>.pt``, ``.dcp``): a ranking read
    from a file names nothing else, so that nothing outside the folder is read or deleted through it."""
    if not (isinstance(name, str) and NUMBERED.fullmatch(name) and name.startswith("best-")):
        raise engine.ConfigError(f"'{source}' ranks {name!r}, which is not a best checkpoint's file name")
    return name


def best_checkpoint(run_dir: Path) -> Path | None:
    """The best checkpoint by the monitored metric: first in checkpoints/best.json's ranking."""
    index = run_dir / FOLDER / RANKING
    try:
        ranking = json.loads(index.read_text(encoding="utf-8"))["ranking"]
        return run_dir / FOLDER / own_name(ranking[0]["file"], index) if ranking else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise engine.ConfigError(f"file '{index}' cannot be read: {engine.one_line(error)}") from None


def snapshot(value: Any) -> Any:
    """`value` with every tensor copied to the CPU now, so that training can go on while it is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


def link(source: Path, target: Path) -> None:
    """`target` becomes the checkpoint `source` is: a hard link (a copy where links are not
    possible); for a directory, a directory of links to its files."""
    if source.is_dir():
        temporary = temporary_path(target)
        remove(temporary)
        temporary.mkdir()
        for file in source.iterdir():
            _link_file(file, temporary / file.name)
        replace_directory(temporary, target)
        return
    with runs.replacing(target) as temporary:
        temporary.unlink()
        _link_file(source, temporary)


def _link_file(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def replace_directory(temporary: Path, path: Path) -> None:
    """Rename the whole directory `temporary` to `path`: a checkpoint of the same step taken again
    (a resumed run interrupted before its first step) replaces the old one, moved aside first."""
    runs.fsync_directory(temporary)
    aside = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        os.replace(path, aside)
    os.replace(temporary, path)
    runs.fsync_directory(path.parent)
    remove(aside)


def remove(path: Path) -> None:
    """Remove a checkpoint file or directory, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
