"""``export`` format ``aoti``: AOTInductor, the ``torch.export`` program compiled ahead of time to a
shared library and packaged as a ``.pt2`` file.

The package loads without the engine (``torch._inductor.aoti_load_package(path)``) and, with
``torch/csrc/inductor/aoti_package``, from C++ without Python. Its shared library is code by
nature: loading the package runs it, so the inference plugin loads one only from a trusted run or
when this machine verified that very file (the package is one zip file: its content hash covers
every file inside it, the library included). Compiling needs a C++ compiler and
takes seconds (about 5 s for the MLP of bench/ on one core, plus 6 s once per process to probe the
CPU's vector instructions).

Calling the loaded package through its Python wrapper (`AOTICompiledModel.__call__`) fetches the
call spec and flattens the arguments with torch's pytree on every call: on the bench MLP at batch
1, one thread, 15.3 µs a call against 8.3 for the compiled runner alone (the flattening is 5 µs of
the difference). The backend calls the runner with the one input tensor instead.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

import engine


class AOTInductor:
    suffix = ".pt2"
    tolerance = 1e-5
    max_batch = None
    auto_rank = 10  # behind ONNX Runtime on the CPU at batch 1 (bench/RESULTS.md, inference)
    runs_code = True  # a shared library, which loading runs

    def missing(self) -> str | None:
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:
            return f"AOTInductor needs a C++ compiler (g++ or clang++; set CXX): {engine.one_line(error)}"
        return None

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        # Into memory first: torch's archive writer fails a full disk with a C++ exception in its
        # destructor, which aborts the process; a Python write raises OSError.
        buffer = io.BytesIO()
        torch._inductor.aoti_compile_and_package(program, package_path=buffer)
        path.write_bytes(buffer.getvalue())

    def load(self, path: Path) -> engine.Runner:
        run = torch._inductor.aoti_load_package(str(path)).loader.run

        def call(x: torch.Tensor) -> torch.Tensor:
            return run([x])[0]

        return call


def aoti() -> AOTInductor:
    """torch.export, then AOTInductor's compile and package (.pt2)."""
    return AOTInductor()


@engine.hookimpl
def register_components():
    return {"export": {"aoti": aoti}}
