"""inference: one forward pass of a trained model, eager against compiled and exported.

The models are the MLP job's (32 -> 256 -> 256 -> 4) and the compiled group's wide one (128 -> 512
-> 512 -> 10 with LayerNorm and GELU), each trained for one epoch by the engine; every contender
runs the run's own weights (`engine.load`), at batch 1 and batch 256. A round is one forward pass,
so the table's µs/step is the latency of a batch; the latency table adds the 99th percentile and
samples per second.

CPU contenders:
- eager: the module under ``torch.inference_mode()`` (the group's baseline);
- torch.compile: the module compiled (Inductor's default mode), under inference mode;
- AOTInductor, package call: ``torch._inductor.aoti_load_package(path)(x)``, the package's own
  Python wrapper;
- AOTInductor, engine backend: ``inference.load_backend(run, backend="aoti")``, which calls the
  compiled runner directly (what `predict` and `evaluate` use);
- ONNX Runtime, engine backend: ``inference.load_backend(run, backend="onnx")`` (what ``auto`` picks on
  the CPU).

CUDA contenders (skipped without a GPU; ``pytest bench/test_inference.py -m cuda`` on one): eager,
torch.compile, the forward captured in a CUDA graph by hand, AOTInductor compiled for CUDA, and
TensorRT fp16 (the ``tensorrt`` export; needs torch-tensorrt). Inputs are on the GPU already.

Compiling costs seconds per contender, so under ``--benchmark-disable`` (the CI smoke run) the
compile and AOTInductor contenders are skipped; tests/plugins/test_export_formats.py checks that
the exported files agree with eager.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import engine_plugins.inference as serving  # not `inference`: the group's fixture has that name
import pytest
import torch
from conftest import JOBS, Group, Job
from engine_plugins.inference.exporting import trace
from test_compiled import WIDE

import engine

BATCHES = (1, 256)
MODELS = {"mlp": JOBS["mlp"], "wide": WIDE}
# Rounds per contender: many short forward passes at batch 1, fewer long ones at batch 256.
ROUNDS = {1: 2000, 256: 300}


@pytest.fixture(params=[(model, batch) for model in MODELS for batch in BATCHES], ids=lambda p: f"{p[0]}-b{p[1]}")
def job(request: pytest.FixtureRequest) -> Job:
    """The trained model and batch size of a benchmark, as the group's job ("mlp-b1", ...)."""
    model, batch = request.param
    return dataclasses.replace(
        MODELS[model], name=f"{model}-b{batch}", rounds=ROUNDS[batch], warmup_rounds=ROUNDS[batch] // 10
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The run of a model's job after one epoch, trained once per session."""
    runs_dir = tmp_path_factory.mktemp("inference-runs")
    done: dict[str, Path] = {}

    def run_of(model: str) -> Path:
        if model not in done:
            overrides = ["epochs=1", f"runs_dir={runs_dir}", f"run_name={model}", "device=cpu"]
            done[model] = engine.run(MODELS[model].config, overrides=overrides, blocked=["console"]).run_dir
        return done[model]

    return run_of


def _model_and_batch(job: Job) -> tuple[str, int]:
    model, _, batch = job.name.rpartition("-b")
    return model, int(batch)


def _inputs(job: Job, device: str) -> torch.Tensor:
    model, batch = _model_and_batch(job)
    width = MODELS[model].config["data"]["n_features"]
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(0)).to(device)


def _measure(
    group: Group, job: Job, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, contender: str, **how
):
    _, batch = _model_and_batch(job)
    group.measure(lambda: run(x), contender, steps_per_round=1, samples_per_step=batch, **how)


def _skip_compiling(group: Group) -> None:
    if group.benchmark.disabled:
        pytest.skip("compiling costs seconds per contender: timed runs only")


# --- the CPU and CUDA rows ----------------------------------------------------------------------


def test_eager(job: Job, device: str, trained, inference: Group) -> None:
    module = engine.load(trained(_model_and_batch(job)[0])).to(device)

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    _measure(inference, job, eager, _inputs(job, device), "eager", baseline=True)


def test_torch_compile(job: Job, device: str, trained, inference: Group) -> None:
    _skip_compiling(inference)
    compiled = torch.compile(engine.load(trained(_model_and_batch(job)[0])).to(device))

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x)

    _measure(inference, job, run, _inputs(job, device), "torch.compile")


# --- CPU: the exported formats as the engine serves them ---------------------------------------


def _cpu_only(device: str) -> None:
    if device != "cpu":
        pytest.skip("the engine's backends take CPU batches; the CUDA rows below time on-device inputs")


def test_aoti_package_call(job: Job, device: str, trained, inference: Group) -> None:
    _cpu_only(device)
    _skip_compiling(inference)
    run = trained(_model_and_batch(job)[0])
    serving.load_backend(run, backend="aoti")  # exported and verified once per run
    package = torch._inductor.aoti_load_package(str(run / "exports" / "final-aoti.pt2"))
    _measure(inference, job, package, _inputs(job, device), "AOTInductor, package call")


def test_aoti_engine_backend(job: Job, device: str, trained, inference: Group) -> None:
    _cpu_only(device)
    _skip_compiling(inference)
    backend = serving.load_backend(trained(_model_and_batch(job)[0]), backend="aoti")
    _measure(inference, job, backend, _inputs(job, device), "AOTInductor, engine backend")


def test_onnx_runtime_engine_backend(job: Job, device: str, trained, inference: Group) -> None:
    _cpu_only(device)
    pytest.importorskip("onnxruntime")
    backend = serving.load_backend(trained(_model_and_batch(job)[0]), backend="onnx")
    _measure(inference, job, backend, _inputs(job, device), "ONNX Runtime, engine backend")


# --- CUDA only ----------------------------------------------------------------------------------


def _cuda_only(device: str) -> None:
    if not device.startswith("cuda"):
        pytest.skip("a CUDA contender")


def test_cuda_graph(job: Job, device: str, trained, inference: Group) -> None:
    """The forward captured once by hand and replayed: the floor for a batch's launch overhead."""
    _cuda_only(device)
    module = engine.load(trained(_model_and_batch(job)[0])).to(device)
    static = _inputs(job, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            module(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        module(static)

    def replay(x: torch.Tensor) -> None:
        static.copy_(x)
        graph.replay()

    _measure(inference, job, replay, _inputs(job, device), "CUDA graph")


def test_aoti_cuda(job: Job, device: str, trained, inference: Group, tmp_path: Path) -> None:
    _cuda_only(device)
    _skip_compiling(inference)
    module = engine.load(trained(_model_and_batch(job)[0])).to(device)
    example = _inputs(job, device)
    program = trace(module, example[:2] if len(example) > 1 else example.repeat(2, 1))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "cuda.pt2"))
    run = torch._inductor.aoti_load_package(path).loader.run
    _measure(inference, job, lambda x: run([x])[0], example, "AOTInductor")


def test_tensorrt_fp16(job: Job, device: str, trained, inference: Group) -> None:
    _cuda_only(device)
    pytest.importorskip("torch_tensorrt")
    _skip_compiling(inference)
    written = serving.export(trained(_model_and_batch(job)[0]), "tensorrt", overrides=["export.precision=fp16"])
    module = torch.export.load(str(written.path)).module()
    x = _inputs(job, device).half()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    _measure(inference, job, run, x, "TensorRT fp16")
