"""``export`` format ``exported``: the bare ``torch.export`` program (``.pt2``), as the inference
plugin traced it (a dynamic batch dimension).

It loads back with ``torch.export.load(path).module()`` wherever torch is installed, without the
engine, and runs the same ATen operators as eager: no faster, so ``--backend auto`` never picks it.

Loading a program runs what it names: its graph's nodes call the Python callables their targets
name, its shape expressions go through sympy's parser, and the archive may hold pickled objects
(torch's docs: never load one from an untrusted source). So the format `runs_code`, and `load`
refuses an archive with pickled objects, which no program of a module traced here has.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

import engine

# What torch.export.save names the pickled objects of an archive (torch/export/pt2_archive/constants.py).
PICKLED = ("opaque_obj_", "custom_obj_")


class Program:
    suffix = ".pt2"
    tolerance = 1e-5
    max_batch = None
    auto_rank = None
    runs_code = True

    def missing(self) -> str | None:
        return None

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        # Into memory first: torch's archive writer fails a full disk with a C++ exception in its
        # destructor, which aborts the process; a Python write raises OSError.
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        path.write_bytes(buffer.getvalue())

    def load(self, path: Path) -> engine.Runner:
        with zipfile.ZipFile(path) as archive:
            pickled = [name for name in archive.namelist() if Path(name).name.startswith(PICKLED)]
        if pickled:
            raise engine.ConfigError(f"'{path}' holds pickled objects ({pickled[0]}), which loading would run")
        module = torch.export.load(path).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return run


def exported() -> Program:
    """The torch.export program, saved with torch.export.save."""
    return Program()


@engine.hookimpl
def register_components():
    return {"export": {"exported": exported}}
