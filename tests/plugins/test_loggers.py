"""plugins/tensorboard.py and plugins/mlflow.py: what they record, read back with each tool's own
reader."""

from __future__ import annotations

import pytest

import engine

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


@pytest.mark.slow
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
