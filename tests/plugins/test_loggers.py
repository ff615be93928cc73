"""plugins/tensorboard.py and plugins/mlflow.py: what they record, read back with each tool's own
reader; plugins/curves.py and `python -m engine plot`: the picture, read back."""

from __future__ import annotations

import warnings

import pytest

import engine
from engine.cli import main

JOB = {
    "epochs": 4,
    "run_name": "logged",
    "data": {"name": "classification", "n_samples": 64, "batch_size": 16, "val_fraction": 0.25},
    "model": {"name": "mlp", "hidden": [8]},
    "loss": {"name": "cross_entropy"},
    "log": {"every": 1},
}


def test_tensorboard_event_files_hold_the_metrics_config_and_model():
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = engine.run({**JOB, "tensorboard": {"enabled": True}})
    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    losses = events.Scalars("loss")
    # 48 training samples in batches of 16: 3 steps an epoch.
    assert [(event.step, event.value) for event in losses][-1] == (12, pytest.approx(result.metrics["loss"]))
    assert len(losses) == 4 and {"val_loss", "train_accuracy", "lr", "val_f1"} <= set(tags["scalars"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "mlp"' in config
    assert {"weights/0.weight", "weights/0.bias"} <= set(tags["histograms"])


@pytest.mark.parametrize("package", ["tensorboard", "mlflow"])
def test_an_enabled_logger_without_its_package_is_refused_before_the_run(monkeypatch, tmp_path, package):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        engine.ConfigError, match=rf"^{package}.enabled: .*pip install 'torch-plugin-engine\[{package}\]'"
    ):
        engine.run({**JOB, package: {"enabled": True}})
    assert not (tmp_path / "runs").exists()  # refused before the run directory


def test_an_mlflow_run_holds_the_params_metrics_artifacts_and_status(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    result = engine.run({**JOB, "mlflow": {"enabled": True, "experiment": "tests"}})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "logged" and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mlp" and run.data.params["optimizer.lr"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [point.step for point in history] == [3, 6, 9, 12]
    assert history[-1].value == pytest.approx(result.metrics["loss"])
    assert {artifact.path for artifact in client.list_artifacts(run.info.run_id)} == {"config.toml", "model.pt"}


def test_a_run_leaves_its_curves_and_plot_overlays_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    monkeypatch.delenv("ENGINE_BLOCK")  # tests block the curves plugin: this one is about it
    first = engine.run({**JOB, "run_name": "first"})
    second = engine.run({**JOB, "run_name": "second", "optimizer": {"lr": 0.05}})
    picture = image.imread(first.run_dir / "curves.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600  # a real figure: several panels
    assert picture[..., :3].std() > 0.05  # not blank
    assert main(["plot", "runs/first", "runs/second", "--out", "both.png"]) == 0
    both = image.imread(tmp_path / "both.png")
    orange = (both[..., 0] > 0.9) & (both[..., 1] > 0.4) & (both[..., 1] < 0.6) & (both[..., 2] < 0.2)  # C1
    assert orange.sum() > 50  # the second run's curves are drawn
    assert second.run_dir.joinpath("curves.png").is_file()


def test_a_run_that_failed_before_its_first_logging_point_plots_without_a_warning(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        engine.report.plot([tmp_path / "early"], tmp_path / "early.png")
    assert (tmp_path / "early.png").is_file()


def test_plot_names_a_missing_run(capsys):
    assert main(["plot", "runs/nothing"]) == 2
    assert capsys.readouterr().err == "error: plot: 'runs/nothing' is not a run directory (it has no metrics.jsonl)\n"
