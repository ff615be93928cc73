"""A run's model ready to run on a batch: eager PyTorch, or a verified export loaded back.

``auto`` tries the formats this machine can run, by their `auto_rank` (highest first), uses a
verified export of these weights in the run's ``exports/`` folder (under the content hash its
record holds) or exports one, and falls back to eager, saying why: whatever stops an export (a
model torch.export cannot trace, inputs it does not take, a check it fails) makes ``auto`` serve
the model eagerly, never an error.

A run whose model computes its loss from its targets (``[model] targets``, or a loss component
returning `engine.ModelLoss`) is evaluated eagerly, called as training called it: an export
takes the inputs alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import engine

from .exporting import Changed, Run, export_format, load_verified, verified_record, write_export

EAGER = "eager"


@dataclass(slots=True)
class Backend:
    """A run's model ready to run: eager, or a verified export loaded back."""

    name: str
    run: engine.Runner
    info: engine.DataInfo
    description: str  # one line: which backend, from which file, and why

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A compiled runner reads its input's memory as laid out at export (AOTInductor assumes it
        # contiguous): a window of a token stream is a strided view.
        return self.run(x.contiguous())


def backend_names(plugins: engine.Plugins) -> list[str]:
    return ["auto", EAGER, *sorted(plugins.components.get("export", {}))]


def load_backend(
    run_dir: str | Path,
    which: str = "final",
    backend: str = "auto",
    *,
    plugins: Iterable[Any] = (),
    blocked: Iterable[str] = (),
    trust: bool = False,
) -> Backend:
    """A run's model on `backend`: ``eager``, an export format, or ``auto`` (see the module
    docstring). `trust`: the run's config may import code, and its exports may hold code."""
    return backend_of(Run.open(run_dir, which, plugins, blocked, trust), backend)


def known_backend(run: Run, backend: str) -> str:
    names = backend_names(run.plugins)
    if backend not in names:
        raise engine.ConfigError(f"--backend: unknown backend {backend!r}{engine.suggest(backend, names)}")
    return backend


def backend_of(run: Run, backend: str, eager_only: str = "") -> Backend:
    """The run's model on `backend`; `eager_only` says why no export can serve it here (evaluating
    a model that takes its targets), which makes auto choose eager and an export format an error."""
    known_backend(run, backend)
    if backend == EAGER:
        return eager(run, "eager (asked for)")
    if eager_only:
        if backend != "auto":
            raise engine.ConfigError(f"--backend {backend}: {eager_only}; use --backend eager")
        return eager(run, f"eager (auto; {eager_only})")
    if backend != "auto":
        return exported(run, backend, export_format(run, backend))
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
            return exported(run, name, chosen, auto=True)
        except Exception as error:  # whatever stops an export, auto serves the model eagerly
            skipped.append(f"{name}: {engine.one_line(error) if not isinstance(error, engine.EngineError) else error}")
    return eager(run, "eager (auto; " + ("; ".join(skipped) or "no export format can serve") + ")")


def eager(run: Run, description: str) -> Backend:
    module = run.module()

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return Backend(EAGER, call, run.info, description)


def exported(run: Run, name: str, chosen: engine.ExportFormat, auto: bool = False) -> Backend:
    """The format's verified export of the run's weights, loaded under its content hash; written
    (and verified) first if there is none, or none this process may load."""
    missing = chosen.missing()
    if missing:
        raise engine.ConfigError(f"--backend {name}: {missing}")
    path = run.export_path(name, chosen.suffix)
    how = "auto" if auto else "asked for"
    record = verified_record(path, run)
    why = ""
    if record is not None and run.may_load(chosen, record["sha256"]):
        try:
            return Backend(
                name, load_verified(chosen, path, record["sha256"]), run.info, f"{name} ({how}; verified export {path})"
            )
        except Changed as changed:
            why = f"{changed}; "
    elif record is not None:  # a verified file that may hold code, from a run received from elsewhere
        why = "its export may run code and the run is not trusted (--trust-run) nor the file verified here; "
    report, runner = write_export(run, name, chosen, path)
    return Backend(name, runner, run.info, f"{name} ({how}; {why}{report.describe()})")
