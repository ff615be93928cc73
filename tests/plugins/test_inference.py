"""plugins/inference/ and its commands: `evaluate`, `predict` and `export` from a run directory.

The oracle is the run's own model (`engine.load`) called by hand, and the run's own validation
figures (summary.json). Runs are trained once per module; each test works in its own directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_plugins import inference
from torch import nn

import engine
from engine.cli import main
from tests.helpers import forged_program, read_json, tutorial_data

CLASSIFY = {
    "epochs": 3,
    "seed": 7,
    "data": {"name": "classification", "n_samples": 400, "n_features": 8, "n_classes": 3, "batch_size": 32},
    "model": {"name": "mlp", "hidden": [16], "dropout": 0.1},
    "loss": {"name": "cross_entropy"},
}
VAL_FRACTION = 0.25


class Branchy(nn.Module):
    """A user model whose control flow depends on the data: torch.export cannot trace it."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def branchy_model(info: engine.DataInfo) -> nn.Module:
    return Branchy(info.n_features, info.n_outputs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The default job (shortened) and a classification job with validation, trained once."""
    runs_dir = tmp_path_factory.mktemp("runs")
    common = {"runs_dir": str(runs_dir)}
    default = engine.run({**common, "epochs": 100, "run_name": "default"})
    classify = engine.run(
        {**common, **CLASSIFY, "run_name": "classify", "data": {**CLASSIFY["data"], "val_fraction": VAL_FRACTION}}
    )
    return {"default": default.run_dir, "classify": classify.run_dir}


def validation_split(tmp_path: Path) -> Path:
    """The classification run's validation samples, in its order, as an npz file."""
    job = {**CLASSIFY, "runs_dir": str(tmp_path / "runs"), "data": {**CLASSIFY["data"], "val_fraction": VAL_FRACTION}}
    x, y = engine.setup(job).loaders.val_data
    path = tmp_path / "val.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- evaluate -------------------------------------------------------------------------------------


def test_evaluate_on_the_runs_validation_data_reproduces_its_final_validation_figures(trained, tmp_path, capsys):
    run = trained["classify"]
    summary = read_json(run / "summary.json")
    code, out, err = run_cli(capsys, "evaluate", run, "--data", validation_split(tmp_path), "--backend", "eager")
    assert code == 0, err
    assert err == "backend: eager (asked for)\n"
    result = json.loads(out)  # one JSON object on stdout
    assert result["samples"] == 100 and result["backend"] == "eager" and result["which"] == "final"
    for name in ("loss", "cross_entropy", "accuracy"):
        assert result[name] == summary[f"val_{name}"], name  # the run's own validation, bit for bit
    assert read_json(run / "evaluations" / "val-final.json") == result


def test_evaluate_on_an_exported_backend_agrees_with_the_run(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = trained["classify"]
    summary = read_json(run / "summary.json")
    code, out, err = run_cli(capsys, "evaluate", run, "--data", validation_split(tmp_path))
    assert code == 0, err
    assert err.startswith("backend: onnx (auto; ")
    result = json.loads(out)
    assert result["backend"] == "onnx"
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1 / 100)


def test_evaluate_a_regression_run_on_a_csv_file_matches_the_loss_by_hand(trained, tmp_path):
    x, y = tutorial_data(seed=3, n=50)
    with open(tmp_path / "held_out.csv", "w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(["x", "y"])
        rows.writerows(zip(x[:, 0].tolist(), y[:, 0].tolist()))
    result = inference.evaluate(
        trained["default"], tmp_path / "held_out.csv", backend="eager", overrides=["data.target=y"]
    )
    model = engine.load(trained["default"])
    x32, y32 = torch.tensor(x[:, 0].tolist())[:, None], torch.tensor(y[:, 0].tolist())[:, None]
    expected = nn.functional.mse_loss(model(x32), y32).item()
    assert result["samples"] == 50 and result["mse"] == pytest.approx(expected, rel=1e-6)
    assert "accuracy" not in result


def test_figures_that_overflow_on_the_data_are_null_and_named(trained, tmp_path, capsys):
    np.savez(tmp_path / "huge.npz", x=np.full((4, 1), 1e30, np.float32), y=np.zeros((4, 1), np.float32))
    code, out, err = run_cli(capsys, "evaluate", trained["default"], "--data", tmp_path / "huge.npz")
    assert code == 0 and err.splitlines()[-1] == "warning: not finite on this data (null below): loss, mse, rmse"
    result = json.loads(out)
    assert result["loss"] is result["mse"] is result["rmse"] is None and result["non_finite"] == ["loss", "mse", "rmse"]
    assert read_json(trained["default"] / "evaluations" / "huge-final.json") == result


# --- predict --------------------------------------------------------------------------------------


def test_predict_gives_classes_and_probabilities_of_the_runs_model(trained):
    run = trained["classify"]
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = torch.softmax(engine.load(run)(x), dim=1)
    predicted = inference.predict(run, x.numpy(), backend="eager", batch_size=64)
    assert set(predicted) == {"class", "probability"}
    torch.testing.assert_close(predicted["probability"], expected, rtol=0, atol=0)
    assert torch.equal(predicted["class"], expected.argmax(dim=1))


def test_predict_gives_a_regression_runs_values(trained):
    x = torch.linspace(-2, 2, 9)[:, None]
    with torch.inference_mode():
        expected = engine.load(trained["default"])(x)
    torch.testing.assert_close(inference.predict(trained["default"], x, backend="eager")["value"], expected)


def test_predict_reads_npz_and_csv_and_writes_csv_and_npz(trained, tmp_path, capsys):
    run = trained["classify"]
    x = np.random.RandomState(0).randn(20, 8).astype(np.float32)
    np.savez(tmp_path / "new.npz", x=x)  # unlabelled
    code, out, err = run_cli(
        capsys, "predict", run, "--data", tmp_path / "new.npz", "--out", "p.csv", "--backend", "eager"
    )
    assert code == 0, err
    assert out == "20 predictions (class, probability): p.csv\n" and err == "backend: eager (asked for)\n"
    with open("p.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["class", "probability_0", "probability_1", "probability_2"]
    expected = inference.predict(run, x, backend="eager")
    assert [int(row[0]) for row in rows[1:]] == expected["class"].tolist()
    np.testing.assert_allclose(np.array(rows[1:], dtype=float)[:, 1:], expected["probability"].numpy(), rtol=1e-6)

    with open(tmp_path / "new.csv", "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow([f"f{i}" for i in range(8)])
        table.writerows(x.tolist())
    assert main(["predict", str(run), "--data", str(tmp_path / "new.csv"), "--out", "p.npz", "--backend", "eager"]) == 0
    saved = np.load("p.npz")
    assert np.array_equal(saved["class"], expected["class"].numpy())
    np.testing.assert_allclose(saved["probability"], expected["probability"].numpy(), rtol=1e-6)


def test_predict_on_auto_uses_the_fastest_verified_export_and_agrees_with_eager(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = trained["classify"]
    x = np.random.RandomState(1).randn(50, 8).astype(np.float32)
    np.savez(tmp_path / "new.npz", x=x)
    assert main(["predict", str(run), "--data", str(tmp_path / "new.npz"), "--out", "p.npz"]) == 0
    assert capsys.readouterr().err.startswith("backend: onnx (auto; ")
    assert (run / "exports" / "final-onnx.onnx").is_file()
    # The next call finds the verified export of these weights instead of exporting again.
    backend = inference.load_backend(run)
    assert backend.description == f"onnx (auto; verified export {run / 'exports' / 'final-onnx.onnx'})"
    expected = inference.predict(run, x, backend="eager")
    np.testing.assert_allclose(np.load("p.npz")["probability"], expected["probability"].numpy(), atol=1e-6)


@pytest.mark.slow
def test_an_export_of_other_weights_is_not_reused():
    pytest.importorskip("onnxruntime")
    run = engine.run({"epochs": 20, "run_name": "retrained"}).run_dir
    first = inference.load_backend(run, backend="onnx")
    assert "verified export" not in first.description  # exported and checked now
    saved = engine.runs.load(run / "model.pt", engine.runs.MODEL_FORMAT)
    saved["model"] = {name: weight + 1.0 for name, weight in saved["model"].items()}  # as if trained on
    engine.runs.save(saved, run / "model.pt")
    again = inference.load_backend(run, backend="onnx")
    assert "verified export" not in again.description  # stale: exported again
    x = torch.randn(5, 1)
    np.testing.assert_allclose(again(x).numpy(), engine.load(run)(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(first(x).numpy(), again(x).numpy())


# --- export ---------------------------------------------------------------------------------------


def test_export_checks_the_file_against_eager_and_records_it(trained, capsys):
    run = trained["default"]
    code, out, err = run_cli(capsys, "export", run, "--format", "exported", "--out", "linear.pt2")
    assert code == 0, err
    assert out.startswith("exported written to linear.pt2 (checked against eager at batch 1, 7, 256: max |diff| 0,")
    record = read_json(Path("linear.pt2.json"))
    assert record["format"] == "exported" and record["which"] == "final"
    assert record["verified"] == {"batch_sizes": [1, 7, 256], "max_abs_diff": 0.0, "tolerance": 1e-5}
    program = torch.export.load("linear.pt2").module()
    x = torch.randn(5, 1)
    torch.testing.assert_close(program(x), engine.load(run)(x))


SHIFTED = """
import torch

import engine


class Shifted:
    '''A third-party format: the torch.export program, loaded back off by `shift`.'''

    suffix = ".shifted"
    tolerance = 1e-5
    max_batch = None
    auto_rank = 99

    def __init__(self, shift):
        self.shift = shift

    def missing(self):
        return None

    def write(self, program, example, path):
        torch.export.save(program, path)

    def load(self, path):
        module = torch.export.load(path).module()
        return lambda x: module(x) + self.shift


def shifted(shift: float = 0.0):
    return Shifted(shift)


@engine.hookimpl
def register_components():
    return {"export": {"shifted": shifted}}
"""


def test_a_third_party_format_is_a_plugin_and_a_file_that_fails_its_check_is_not_written(trained, tmp_path, capsys):
    (tmp_path / "shifted_format.py").write_text(SHIFTED)
    run = trained["default"]
    plugin = ["--plugin", "shifted_format.py"]
    code, out, err = run_cli(capsys, "export", run, "--format", "shifted", "--out", "ok.shifted", *plugin)
    assert code == 0, err
    assert Path("ok.shifted").is_file() and out.startswith("shifted written to ok.shifted")
    code, out, err = run_cli(
        capsys, "export", run, "--format", "shifted", "--out", "bad.shifted", "--set", "export.shift=0.1", *plugin
    )
    assert code == 1
    assert err.startswith("error: export shifted: the file's model differs from eager by 0.1 at batch 1")
    assert err.endswith("(tolerance 1e-05); nothing written\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ok.shifted", "ok.shifted.json", "shifted_format.py"]


def test_a_model_torch_export_cannot_trace_is_exit_2_naming_the_model_and_the_line(tmp_path, capsys):
    model = f"{__name__}:branchy_model"
    run = engine.run({"epochs": 2, "run_name": "branchy", "model": {"name": model}}).run_dir
    capsys.readouterr()
    code, out, err = run_cli(capsys, "export", run, "--format", "exported", "--trust-run")  # our own model
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: export exported: model '{model}' (Branchy): torch.export cannot trace it at ")
    assert "test_inference.py" in err and "in forward (`if x.sum() > 0:`)" in err
    assert "data-dependent expression" in err
    assert not (run / "exports" / "final-exported.pt2").exists()
    backend = inference.load_backend(run, trust=True)  # auto falls back to eager, saying why
    assert backend.name == "eager" and "torch.export cannot trace it" in backend.description


# --- what is at fault ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["export", "runs/nope", "--format", "onnx"],
            "error: 'runs/nope' is not a run directory (it has no config.toml)",
        ),
        (["predict", "runs/nope", "--data", "x.npz", "--out", "p.npz"], "error: 'runs/nope' is not a run directory"),
        (
            ["evaluate", "{classify}", "--data", "narrow.npz"],
            "error: --data 'narrow.npz': 3 features per sample, but run",
        ),
        (["predict", "{classify}", "--data", "narrow.npz", "--out", "p.npz"], "error: --data 'narrow.npz': 3 features"),
        (
            ["export", "{classify}", "--format", "onxx"],
            "error: --format: unknown export format 'onxx' (did you mean 'onnx'?)",
        ),
        (
            ["evaluate", "{classify}", "--data", "narrow.npz", "--backend", "eagre"],
            "error: --backend: unknown backend 'eagre' (did you mean 'eager'?)",
        ),
        (["evaluate", "{classify}", "--data", "missing.npz"], "error: --data: file 'missing.npz' does not exist"),
        (
            ["evaluate", "{classify}", "--data", "data.txt"],
            "error: --data 'data.txt': no data component reads .txt files",
        ),
        (
            ["export", "{classify}", "--format", "exported", "--out", "model.onnx"],
            "error: --out: a exported file's name ends with '.pt2'",
        ),
        (
            ["export", "{unsaved}", "--format", "exported"],
            "error: run '{unsaved}' has no model.pt: it did not complete",
        ),
        # Where the output goes, checked before anything is computed.
        (
            ["predict", "{classify}", "--data", "new.npz", "--out", "folder.csv"],
            "error: --out 'folder.csv' is a folder",
        ),
        (
            ["predict", "{classify}", "--data", "new.npz", "--out", "missing/p.csv"],
            "error: --out 'missing/p.csv': the folder 'missing' does not exist",
        ),
        (
            ["predict", "{classify}", "--data", "new.npz", "--out", "/proc/p.csv"],
            "error: --out '/proc/p.csv': cannot write in '/proc': ",
        ),
        (
            ["export", "{classify}", "--format", "exported", "--out", "folder.csv"],
            "error: --out 'folder.csv' is a folder",
        ),
        (
            ["export", "{classify}", "--format", "exported", "--out", "missing/m.pt2"],
            "error: --out 'missing/m.pt2': the folder 'missing' does not exist",
        ),
        (
            ["export", "{classify}", "--format", "exported", "--out", "/proc/m.pt2"],
            "error: --out '/proc/m.pt2': cannot write in '/proc': ",
        ),
        # What predict reads.
        (
            ["predict", "{classify}", "--data", "new.npz", "--out", "p.csv", "--batch-size", "0"],
            "error: --batch-size: expected 1 or more samples, got 0",
        ),
        (
            ["predict", "{classify}", "--data", "new.npz", "--out", "p.csv", "--batch-size", "-3"],
            "error: --batch-size: expected 1 or more samples, got -3",
        ),
        (
            ["predict", "{classify}", "--data", "empty.npz", "--out", "p.csv"],
            "error: --data 'empty.npz': holds no samples",
        ),
        (
            ["predict", "{classify}", "--data", "holes.npz", "--out", "p.csv"],
            "error: --data 'holes.npz': row 2 (counting from 0) holds a value that is not finite (NaN or inf), and 2 "
            "rows in all; predict them anyway with --pass-non-finite",
        ),
        (
            ["evaluate", "{classify}", "--data", "new.npz", "--which", "bogus"],
            "error: which: expected one of 'final', 'best', 'last', got 'bogus'",
        ),
        (
            ["predict", "{classify}", "--data", "new.npz"],
            "error: python -m engine predict: the following arguments are required: --out (--help shows the usage)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, trained, capsys):
    unsaved = Path("runs/unsaved")  # a run that never wrote its model
    unsaved.mkdir(parents=True)
    shutil.copy(trained["classify"] / "config.toml", unsaved / "config.toml")
    np.savez("narrow.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    np.savez("new.npz", x=np.zeros((4, 8), np.float32))
    np.savez("empty.npz", x=np.zeros((0, 8), np.float32))
    holes = np.zeros((5, 8), np.float32)
    holes[2, 3], holes[4, 0] = np.nan, np.inf
    np.savez("holes.npz", x=holes)
    Path("folder.csv").mkdir()
    Path("data.txt").write_text("1 2 3\n")
    paths = {"classify": trained["classify"], "unsaved": unsaved}
    try:
        code, _, err = run_cli(capsys, *(arg.format(**paths) for arg in argv))
    except SystemExit as usage:  # argparse's, in one line too
        code, err = usage.code, capsys.readouterr().err
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith(message.format(**paths)), err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error")] == [last]
    assert not Path("p.csv").exists() and not Path("missing").exists()


def test_a_file_with_an_unknown_suffix_to_write_is_named(trained, capsys):
    np.savez("new.npz", x=np.zeros((4, 8), np.float32))
    code, _, err = run_cli(
        capsys, "predict", trained["classify"], "--data", "new.npz", "--out", "p.parquet", "--backend", "eager"
    )
    assert code == 2 and err.splitlines()[-1].startswith(
        "error: --out 'p.parquet': no predictions component writes .parquet files"
    )


def test_predict_passes_inputs_that_are_not_finite_only_when_asked(trained, capsys):
    holes = np.random.RandomState(0).randn(5, 8).astype(np.float32)
    holes[3, 1] = np.nan
    np.savez("holes.npz", x=holes)
    argv = ["predict", trained["classify"], "--data", "holes.npz", "--out", "p.npz", "--backend", "eager"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "row 3 (counting from 0) holds a value that is not finite" in err
    with pytest.raises(engine.ConfigError, match=r"^the inputs: row 3 \(counting from 0\)"):
        inference.predict(trained["classify"], holes, backend="eager")
    code, _, err = run_cli(capsys, *argv, "--pass-non-finite")
    assert code == 0, err
    probability = np.load("p.npz")["probability"]
    assert np.isnan(probability[3]).all() and np.isfinite(probability[[0, 1, 2, 4]]).all()


# --- a run directory is data ----------------------------------------------------------------------


def test_a_run_whose_model_is_code_is_served_only_when_trusted(tmp_path, capsys):
    run = engine.run({"epochs": 2, "run_name": "user", "model": {"name": "tests.helpers:scaled_model"}}).run_dir
    np.savez("new.npz", x=np.zeros((3, 1), np.float32))
    capsys.readouterr()
    for command in (["predict", run, "--data", "new.npz", "--out", "p.npz"], ["export", run, "--format", "exported"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and out == ""
        assert err == (
            f"error: run '{run}' names code that opening it would import: model.name = 'tests.helpers:scaled_model'; "
            "a run directory is data: pass --trust-run (trust=True) if you trust it, or give its plugins with "
            "--plugin\n"
        )
    assert not Path("p.npz").exists() and not (run / "exports").exists()
    assert run_cli(capsys, "predict", run, "--data", "new.npz", "--out", "p.npz", "--trust-run")[0] == 0


def test_an_export_is_used_only_under_the_content_hash_its_record_holds(trained, tmp_path):
    run = Path(shutil.copytree(trained["default"], tmp_path / "run"))
    written = inference.export(run, "exported")
    record = read_json(written.path.with_name(written.path.name + ".json"))
    assert record["sha256"] == hashlib.sha256(written.path.read_bytes()).hexdigest() == written.sha256
    assert (
        inference.load_backend(run, backend="exported").description
        == f"exported (asked for; verified export {written.path})"
    )
    # Another run's export put in its place, the record untouched: not the file that was checked.
    other = engine.run({"epochs": 5, "run_name": "other", "optimizer": {"lr": 0.5}}).run_dir
    shutil.copy(inference.export(other, "exported").path, written.path)
    backend = inference.load_backend(run, backend="exported")
    assert backend.description.startswith(
        f"exported (asked for; export '{written.path}' is not the file its record verified (its content hash "
        "differs); exported written to"
    )
    x = torch.randn(4, 1)
    torch.testing.assert_close(backend(x), engine.load(run)(x))  # this run's model, exported again


def test_an_export_that_may_run_code_is_loaded_only_when_trusted_or_verified_on_this_machine(
    trained, tmp_path, monkeypatch
):
    run = Path(shutil.copytree(trained["default"], tmp_path / "run"))
    written = inference.export(run, "exported")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-machine"))  # a run received from elsewhere
    backend = inference.load_backend(run, backend="exported")
    assert "its export may run code and the run is not trusted (--trust-run) nor the file verified here" in (
        backend.description
    )
    trusted = inference.load_backend(run, backend="exported", trust=True)
    assert trusted.description == f"exported (asked for; verified export {written.path})"


def test_a_forged_program_under_a_forged_record_does_not_run_even_from_a_trusted_run(trained, tmp_path, capsys):
    run = Path(shutil.copytree(trained["default"], tmp_path / "run"))
    written = inference.export(run, "exported")
    marker = tmp_path / "ran.txt"
    forged_program(written.path, written.path, marker)
    record_file = written.path.with_name(written.path.name + ".json")
    record = read_json(record_file)
    record["sha256"] = hashlib.sha256(written.path.read_bytes()).hexdigest()  # the forger rewrote it too
    record_file.write_text(json.dumps(record))
    np.savez("new.npz", x=np.zeros((3, 1), np.float32))
    argv = ["predict", run, "--data", "new.npz", "--out", "p.npz", "--backend", "exported", "--trust-run"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith(f"error: export '{written.path}' cannot be loaded: UnpicklingError: Weights")
    assert err.count("\n") == 1
    assert not marker.exists()  # torch.load was held to weights_only
    with zipfile.ZipFile(written.path, "a") as archive:
        archive.writestr("exported/data/constants/opaque_obj_0", b"anything")  # plain pickle in torch.export.load
    record["sha256"] = hashlib.sha256(written.path.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.endswith(
        "holds pickled objects (exported/data/constants/opaque_obj_0), which loading would run\n"
    )


def test_a_file_evaluate_cannot_read_is_refused_before_a_backend_exports_into_the_run(trained, tmp_path, capsys):
    """auto exports the model into the run to serve it: not for a file that cannot be evaluated."""
    run = Path(shutil.copytree(trained["classify"], tmp_path / "run"))
    for made in ("exports", "evaluations"):  # by other tests of the shared run
        shutil.rmtree(run / made, ignore_errors=True)
    np.savez("unlabelled.npz", x=np.zeros((4, 8), np.float32))
    code, out, err = run_cli(capsys, "evaluate", run, "--data", "unlabelled.npz")
    assert code == 2 and out == "" and err.startswith("error: data.path: file ") and err.count("\n") == 1
    assert not (run / "exports").exists() and not (run / "evaluations").exists()
