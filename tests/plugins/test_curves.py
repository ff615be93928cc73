"""plugins/metrics_file/curves.py: a run's curves.png and `python -m engine plot`, which overlays runs;
the pictures read back. The suite's other runs draw none (tests/conftest.py)."""

from __future__ import annotations

import json
import warnings

import pytest
from engine_plugins.metrics_file.curves import _panels, plot

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


pytestmark = pytest.mark.curves  # the suite's other runs draw no curves (tests/conftest.py)


def test_a_run_leaves_its_curves_and_plot_overlays_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    first = engine.run({**JOB, "run_name": "first"})
    second = engine.run({**JOB, "run_name": "second", "optimizer": {"lr": 0.05}, "log": {"curves": False}})
    picture = image.imread(first.run_dir / "curves.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 600  # a real figure: several panels
    assert picture[..., :3].std() > 0.05  # not blank
    assert not second.run_dir.joinpath("curves.png").exists()  # log.curves = false
    assert main(["plot", "runs/first", "runs/second", "--out", "both.png"]) == 0
    both = image.imread(tmp_path / "both.png")
    orange = (both[..., 0] > 0.9) & (both[..., 1] > 0.4) & (both[..., 1] < 0.6) & (both[..., 2] < 0.2)  # C1
    assert orange.sum() > 50  # the second run's curves are drawn
    alone = image.imread(first.run_dir / "curves.png")
    orange = (alone[..., 0] > 0.9) & (alone[..., 1] > 0.4) & (alone[..., 1] < 0.6) & (alone[..., 2] < 0.2)
    assert orange.sum() < 10  # one run: no second colour


def test_a_run_that_failed_before_its_first_logging_point_plots_without_a_warning(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        plot([tmp_path / "early"], tmp_path / "early.png")
    assert (tmp_path / "early.png").is_file()


def test_plot_names_a_missing_run(capsys):
    assert main(["plot", "runs/nothing"]) == 2
    assert capsys.readouterr().err == (
        "error: plot: 'runs/nothing' has no metrics.jsonl (not a run directory, or none was logged)\n"
    )


def test_without_the_metrics_file_a_run_draws_nothing_and_fails_not():
    result = engine.run({**JOB, "epochs": 2}, blocked=["metrics_file"])
    assert not (result.run_dir / "curves.png").exists()


def test_the_panels_are_the_loss_then_each_metric_once_without_a_term_that_is_the_whole_loss():
    one_term = [
        {"epoch": 1, "step": 3, "loss": 0.9, "mse": 0.9, "lr": 0.1, "time": 1.0},
        {"epoch": 2, "step": 6, "loss": 0.5, "mse": 0.5, "val_loss": 0.6, "val_mse": 0.6, "lr": 0.1, "time": 2.0},
    ]
    assert _panels(one_term) == ["loss"]
    terms = [
        {"epoch": 1, "loss": 1.0, "cross_entropy": 0.9, "l2": 0.1, "train_accuracy": 0.5, "val_accuracy": 0.6},
        {"epoch": 2, "loss": 0.8, "cross_entropy": 0.7, "l2": 0.1, "val_f1": None, "val_auroc": float("nan")},
    ]
    assert _panels(terms) == ["loss", "cross_entropy", "l2", "accuracy"]  # a null or NaN one draws nothing
    assert json.dumps(_panels([])) == '["loss"]'
