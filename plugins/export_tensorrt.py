"""``export`` format ``tensorrt``: the ``torch.export`` program compiled by Torch-TensorRT for the
GPU, saved as an ExportedProgram that embeds the TensorRT engine (``.ep``).

Needs CUDA and the ``tensorrt`` extra (torch-tensorrt). ``precision = "fp16"`` (the default)
exports the model in half precision, so the engine's layers are fp16 and its check against eager
uses fp16's tolerance; ``"fp32"`` turns TF32 off as well, to stay within 1e-4 of eager. The engine
is built for batches from 1 to `max_batch`, tuned for `opt_batch`. The backend takes CPU batches
and returns float32 CPU outputs, so that it serves `predict` and `evaluate` like the others.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Annotated, Literal

import torch

import engine

Batch = Annotated[int, engine.Range(ge=1)]


class TensorRT:
    suffix = ".ep"
    auto_rank = 30  # where it can run (a GPU), ahead of the CPU formats
    runs_code = True  # a torch.export program (its graph names Python callables) around a TensorRT engine

    def __init__(self, precision: str, max_batch: int, opt_batch: int) -> None:
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.tolerance = 1e-2 if precision == "fp16" else 1e-4
        self.max_batch, self.opt_batch = max_batch, min(opt_batch, max_batch)

    def missing(self) -> str | None:
        install = "pip install 'torch-plugin-engine[tensorrt]'"
        if not torch.cuda.is_available():
            return f"TensorRT needs an NVIDIA GPU with CUDA, and torch-tensorrt: {install} on a machine with one"
        if importlib.util.find_spec("torch_tensorrt") is None:
            return f"TensorRT needs torch-tensorrt: {install}"
        return None

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        import torch_tensorrt

        # The program's module in the engine's precision on the GPU, traced again there with the
        # batch dimension bounded by what the engine is built for.
        module = copy.deepcopy(program.module()).to("cuda", self.dtype)
        example = example.to("cuda", self.input_dtype(example))
        batch = torch.export.Dim("batch", min=1, max=self.max_batch)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        width = tuple(example.shape[1:])
        spec = torch_tensorrt.Input(
            min_shape=(1, *width),
            opt_shape=(self.opt_batch, *width),
            max_shape=(self.max_batch, *width),
            dtype=example.dtype,
        )
        compiled = torch_tensorrt.dynamo.compile(
            program,
            inputs=[spec],
            enabled_precisions={self.dtype},
            disable_tf32=self.dtype == torch.float32,
            min_block_size=1,
        )
        torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=[example])

    def load(self, path: Path) -> engine.Runner:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the program calls)

        module, dtype = torch.export.load(str(path)).module(), self.dtype

        def call(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x.to("cuda", dtype if x.is_floating_point() else None)).float().cpu()

        return call

    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The engine's precision for features; integer inputs (token ids) keep their type."""
        return self.dtype if x.is_floating_point() else x.dtype


def tensorrt(precision: Literal["fp16", "fp32"] = "fp16", max_batch: Batch = 1024, opt_batch: Batch = 256) -> TensorRT:
    """Torch-TensorRT on CUDA, for batches of 1 to `max_batch`."""
    return TensorRT(precision, max_batch, opt_batch)


@engine.hookimpl
def register_components():
    return {"export": {"tensorrt": tensorrt}}
