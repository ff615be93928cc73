"""``export`` format ``exported``: the bare ``torch.export`` program (``.pt2``), as the inference
plugin traced it (a dynamic batch dimension).

It loads back with ``torch.export.load(path).module()`` wherever torch is installed, without the
engine, and runs the same ATen operators as eager: no faster, so ``--backend auto`` never picks it.
"""

from __future__ import annotations

from pathlib import Path

import torch

import engine


class Program:
    suffix = ".pt2"
    tolerance = 1e-5
    max_batch = None
    auto_rank = None

    def missing(self) -> str | None:
        return None

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        torch.export.save(program, path)

    def load(self, path: Path) -> engine.Runner:
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
