"""plugins/export_*.py: each export format on the zoo of the test suite's jobs, its file loaded back
without the engine and compared with the run's eager model, and what it says where it cannot run.

The oracle is `engine.load`'s module; each file is read back by its own runtime (torch.export,
ONNX Runtime, AOTInductor's loader), not through the plugin that wrote it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_plugins import inference

import engine
from engine.cli import main
from tests.helpers import bar_images

CLASSES = {"name": "classification", "n_samples": 200, "n_features": 6, "n_classes": 3, "batch_size": 50}
ZOO = {
    "linear": {},
    "mlp": {"data": CLASSES, "model": {"name": "mlp", "hidden": [16, 16]}, "loss": {"name": "cross_entropy"}},
    "mlp-layer-norm-dropout": {
        "data": CLASSES,
        "model": {"name": "mlp", "hidden": [16], "layer_norm": True, "dropout": 0.2, "activation": "gelu"},
        "loss": {"name": "cross_entropy"},
    },
    "user-module": {"model": {"name": "tests.helpers:scaled_model", "scale": 0.5}},
    # The model behind its input transform (engine.WithInputTransform): raw inputs in.
    "standardized": {
        "data": {**CLASSES, "standardize": True},
        "model": {"name": "mlp", "hidden": [8]},
        "loss": {"name": "cross_entropy"},
    },
    # Images (1 x 8 x 8): exports are traced and checked on inputs of the run's input shape.
    "cnn": {
        "data": {"name": "tests.helpers:bar_images", "n_samples": 60, "batch_size": 20},
        "model": {"name": "cnn", "channels": [4, 8], "hidden": [16], "dropout": 0.1},
        "loss": {"name": "cross_entropy"},
    },
}
BATCHES = (1, 5, 64)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    runs_dir = tmp_path_factory.mktemp("zoo")
    return {
        name: engine.run({"epochs": 3, "run_name": name, "runs_dir": str(runs_dir), **job}).run_dir
        for name, job in ZOO.items()
    }


def agree(run: Path, loaded, tolerance: float) -> None:
    """`loaded` (a function of a CPU batch) gives the eager model's outputs at several batch sizes."""
    model = engine.load(run, trust=True)  # the zoo's runs are ours (one names a user module)
    generator = torch.Generator().manual_seed(3)
    for size in BATCHES:
        x = torch.randn(size, *_shape(run), generator=generator) * 3
        with torch.inference_mode():
            expected = model(x)
        torch.testing.assert_close(torch.as_tensor(loaded(x)), expected, rtol=tolerance, atol=tolerance)


def _shape(run: Path) -> tuple[int, ...]:
    """One input sample's shape, as the run recorded it."""
    return tuple(engine.load_config(run / "config.toml")[0]["inferred"]["input_shape"])


@pytest.mark.parametrize("job", list(ZOO))
def test_exported_agrees_with_eager_on_the_zoo(zoo, job):
    written = inference.export(zoo[job], "exported", trust=True)
    assert written.path == zoo[job] / "exports" / "final-exported.pt2"
    assert written.verified["max_abs_diff"] <= 1e-5
    agree(zoo[job], torch.export.load(written.path).module(), 1e-5)


# The richest models in the default run; the others (a second each) with the slow tests.
RICHEST = ("mlp-layer-norm-dropout", "standardized", "cnn")


@pytest.mark.slow
@pytest.mark.parametrize("job", [job if job in RICHEST else pytest.param(job, marks=pytest.mark.slow) for job in ZOO])
def test_onnx_agrees_with_eager_on_the_zoo(zoo, job):
    onnxruntime = pytest.importorskip("onnxruntime")
    written = inference.export(zoo[job], "onnx", trust=True)
    assert written.path.suffix == ".onnx" and not Path(f"{written.path}.data").exists()  # weights inside
    session = onnxruntime.InferenceSession(str(written.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    agree(zoo[job], lambda x: session.run(None, {name: x.numpy()})[0], 1e-5)


LOAD_WITHOUT_THE_ENGINE = """
import sys

sys.modules["engine"] = sys.modules["engine_plugins"] = None  # importing either now fails
import torch
import torch._inductor

package = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
torch.save([package(x) for x in inputs], sys.argv[3])
"""


@pytest.mark.slow  # an AOTInductor compile: 13 s on two cores
def test_aoti_package_loads_without_the_engine_and_agrees_with_eager(zoo, tmp_path):
    """One AOTInductor compile (seconds): the zoo's richest model, layer norm and dropout."""
    run = zoo["mlp-layer-norm-dropout"]
    written = inference.export(run, "aoti")
    assert written.verified["batch_sizes"] == [1, 7, 256] and written.verified["max_abs_diff"] <= 1e-5
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(size, 6, generator=generator) * 3 for size in BATCHES]
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_THE_ENGINE)
    done = subprocess.run(
        [sys.executable, "load.py", str(written.path), "inputs.pt", "outputs.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    model = engine.load(run, trust=True)  # the zoo's runs are ours (one names a user module)
    for x, got in zip(inputs, torch.load(tmp_path / "outputs.pt")):
        with torch.inference_mode():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    # The backend (the verified file, not compiled again) calls the compiled runner directly,
    # past the package's Python wrapper.
    backend = inference.load_backend(run, backend="aoti")
    assert backend.description == f"aoti (asked for; verified export {written.path})"
    agree(run, backend, 1e-5)


@pytest.mark.slow  # an export per format and a trainer per evaluation: 10 s; the zoo's tests export the CNN too
def test_the_cnn_serves_predict_and_evaluate_on_each_format_as_eager_does(zoo, tmp_path):
    run = zoo["cnn"]
    x, y = bar_images(9, 30)
    np.savez(tmp_path / "held_out.npz", x=x, y=y)
    eager = inference.predict(run, x, backend="eager", trust=True)
    assert eager["probability"].shape == (30, 3) and torch.equal(eager["class"], eager["probability"].argmax(-1))
    expected = inference.evaluate(run, tmp_path / "held_out.npz", backend="eager", trust=True)
    formats = ["exported", *(["onnx"] if importlib.util.find_spec("onnxruntime") else [])]
    for name in formats:
        written = inference.export(run, name, trust=True)
        assert written.verified["batch_sizes"] == [1, 7, 256] and written.verified["max_abs_diff"] <= 1e-5
        served = inference.predict(run, x, backend=name, trust=True)
        assert torch.equal(served["class"], eager["class"]), name
        torch.testing.assert_close(served["probability"], eager["probability"], rtol=1e-5, atol=1e-5)
        evaluated = inference.evaluate(run, tmp_path / "held_out.npz", backend=name, trust=True)
        assert evaluated["loss"] == pytest.approx(expected["loss"], rel=1e-5), name


@pytest.mark.slow  # an AOTInductor compile of a convolutional network: about 40 s on two loaded cores
def test_aoti_of_the_cnn_agrees_with_eager(zoo):
    written = inference.export(zoo["cnn"], "aoti", trust=True)
    assert written.verified["max_abs_diff"] <= 1e-5
    agree(zoo["cnn"], inference.load_backend(zoo["cnn"], backend="aoti", trust=True), 1e-5)


@pytest.mark.cuda
def test_tensorrt_agrees_with_eager_within_fp16_and_fp32_tolerance(zoo, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    pytest.importorskip("torch_tensorrt")
    from engine_plugins.export_tensorrt import tensorrt

    run = zoo["mlp"]
    for precision, tolerance in (("fp16", 1e-2), ("fp32", 1e-4)):
        out = tmp_path / f"{precision}.ep"
        written = inference.export(run, "tensorrt", out=out, overrides=[f"export.precision={precision}"])
        assert written.verified["tolerance"] == tolerance
        agree(run, tensorrt(precision).load(written.path), tolerance)  # the file written, at its own tolerance


def test_tensorrt_without_cuda_or_torch_tensorrt_says_what_to_install_in_one_line(zoo, capsys):
    if torch.cuda.is_available():
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("CUDA and torch-tensorrt are here: the format runs")
    assert main(["export", str(zoo["mlp"]), "--format", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("error: export tensorrt: TensorRT needs ")
    assert err.rstrip().endswith(
        "pip install 'torch-plugin-engine[tensorrt]'" + ("" if torch.cuda.is_available() else " on a machine with one")
    )


def test_onnx_without_its_packages_says_what_to_install(zoo, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(zoo["linear"]), "--format", "onnx", "--out", "x.onnx"]) == 2
    assert capsys.readouterr().err == (
        "error: export onnx: ONNX export needs onnxruntime: pip install 'torch-plugin-engine[onnx]'\n"
    )
    backend = inference.load_backend(zoo["linear"], blocked=["export_aoti"])  # auto passes it over, and says so
    assert "onnx: ONNX export needs onnxruntime" in backend.description


# --- what a format cannot honour, and files it will not load ---------------------------------------


@pytest.mark.slow  # two ONNX exports, seconds each
def test_an_onnx_opset_the_exporter_cannot_write_is_refused_naming_the_key(zoo, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    run = zoo["mlp"]
    argv = ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*argv, "--set", "export.opset=13"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: export onnx: model 'mlp' (Sequential): export.opset: 13 asked for, but torch's ONNX exporter can write "
        "this model in opset 18 only (0: its default)\n"
    )
    assert not (tmp_path / "m.onnx").exists()
    assert main([*argv, "--set", "export.opset=19"]) == 0
    assert [entry.version for entry in onnx.load(tmp_path / "m.onnx").opset_import if entry.domain == ""] == [19]


def test_an_onnx_file_that_does_not_load_is_one_line_and_auto_passes_it_over(zoo, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = Path(shutil.copytree(zoo["linear"], tmp_path / "run"))
    written = inference.export(run, "onnx")
    written.path.write_bytes(b"not an onnx file")
    record_file = written.path.with_name(written.path.name + ".json")
    record = json.loads(record_file.read_text())
    record["sha256"] = hashlib.sha256(written.path.read_bytes()).hexdigest()  # a record forged to match
    record_file.write_text(json.dumps(record))
    with pytest.raises(engine.ConfigError, match=rf"^export '{written.path}' cannot be loaded: "):
        inference.load_backend(run, backend="onnx")
    backend = inference.load_backend(run, blocked=["export_aoti"])
    assert backend.name == "eager" and f"onnx: export '{written.path}' cannot be loaded: " in backend.description


def test_an_onnx_file_that_takes_its_weights_from_other_files_is_refused(zoo, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    run = Path(shutil.copytree(zoo["linear"], tmp_path / "run"))
    written = inference.export(run, "onnx")
    model = onnx.load(written.path)
    convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, written.path)  # (its data file lands beside it; ONNX Runtime would read what it names)
    record_file = written.path.with_name(written.path.name + ".json")
    record = json.loads(record_file.read_text())
    record["sha256"] = hashlib.sha256(written.path.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))
    with pytest.raises(engine.ConfigError, match=r"takes its weights from other files \(.*\); its own are inside it"):
        inference.load_backend(run, backend="onnx")


@pytest.mark.slow  # an AOTInductor compile
def test_a_received_aoti_export_is_compiled_again_not_loaded_unless_trusted(zoo, tmp_path, monkeypatch):
    """A shared library is code: the record a run brings with it cannot vouch for it."""
    run = Path(shutil.copytree(zoo["linear"], tmp_path / "run"))
    written = inference.export(run, "aoti")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-machine"))
    backend = inference.load_backend(run, backend="aoti")
    assert "its export may run code and the run is not trusted (--trust-run)" in backend.description
    assert (
        inference.load_backend(run, backend="aoti").description == f"aoti (asked for; verified export {written.path})"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-third-machine"))
    assert inference.load_backend(run, backend="aoti", trust=True).description.endswith(
        f"verified export {written.path})"
    )
