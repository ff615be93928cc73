"""``export`` format ``onnx``: ``torch.onnx.export(..., dynamo=True)`` of the ``torch.export``
program, with its weights inside the file, run by ONNX Runtime's CPU provider.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime). The session gets torch's intra-op
thread count, so a backend and eager compare on the same threads. On the CPU ONNX Runtime was the
fastest backend measured at batch 1 (bench/RESULTS.md, inference), so ``--backend auto`` tries it
first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path
from typing import Annotated, Any

import torch

import engine

PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class Onnx:
    suffix = ".onnx"
    tolerance = 1e-5
    max_batch = None
    auto_rank = 20
    runs_code = False  # a graph of ONNX operators with its weights inside: data, which ONNX Runtime interprets

    def __init__(self, opset: int | None) -> None:
        self.opset = opset

    def missing(self) -> str | None:
        absent = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
        if absent:
            return f"ONNX export needs {', '.join(absent)}: pip install 'torch-plugin-engine[onnx]'"
        return None

    def write(self, program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx prints each pass it runs
            exported = torch.onnx.export(program, (example,), dynamo=True, opset_version=self.opset, verbose=False)
        written = opset_of(exported.model_proto)
        if self.opset is not None and written != self.opset:
            # torch's exporter writes its own opset when it cannot convert the model to the one asked for
            raise engine.ConfigError(
                f"export.opset: {self.opset} asked for, but torch's ONNX exporter can write this model in opset "
                f"{written} only (0: its default)"
            )
        exported.save(str(path), external_data=False)

    def load(self, path: Path) -> engine.Runner:
        import onnx
        import onnxruntime

        # The file holds its weights (they are written inside it); one that points at external
        # files would have ONNX Runtime read whatever they name.
        outside = [
            tensor.name
            for tensor in onnx.load(str(path), load_external_data=False).graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
        ]
        if outside:
            raise engine.ConfigError(
                f"'{path}' takes its weights from other files ({outside[0]}); its own are inside it"
            )

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name, run = session.get_inputs()[0].name, session.run

        def call(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(run(None, {name: x.numpy()})[0])

        return call


def opset_of(model: Any) -> int:
    """The version of the default ("") ONNX operator set a model uses."""
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def onnx(opset: Annotated[int, engine.Range(ge=0)] = 0) -> Onnx:
    """ONNX through the dynamo exporter; `opset` 0: torch's default."""
    return Onnx(opset or None)


@engine.hookimpl
def register_components():
    return {"export": {"onnx": onnx}}
