"""plugins/datasets.py: the tutorial's data, seeded classification blobs, .npz and .csv files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_plugins import datasets

import engine
from tests.helpers import classification_data, job, tutorial_data


def test_linear_regression_is_the_tutorials_data():
    x, y = datasets.linear_regression(seed=42)
    tx, ty = tutorial_data()
    assert x.dtype == np.float32 and x.shape == (100, 1)
    assert torch.equal(torch.from_numpy(x), tx) and torch.equal(torch.from_numpy(y), ty)


def test_classification_is_seeded():
    x, y = datasets.classification(seed=5, n_samples=50, n_features=3, n_classes=3)
    again = datasets.classification(seed=5, n_samples=50, n_features=3, n_classes=3)
    other = datasets.classification(seed=6, n_samples=50, n_features=3, n_classes=3)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, other[0])
    assert x.shape == (50, 3) and y.dtype == np.int64 and set(y) == {0, 1, 2}
    ex, ey = classification_data(5, 50, 3, 3, 0.5)
    assert np.array_equal(x, ex.numpy()) and np.array_equal(y, ey.numpy())


def test_classification_needs_two_classes():
    with pytest.raises(engine.ConfigError, match=r"data.n_classes: must be >= 2, got 1"):
        engine.setup(job(data={"name": "classification", "n_classes": 1}))


def test_classification_infers_the_model_and_loss_sizes():
    trainer = engine.setup(
        job(data={"name": "classification", "n_features": 7, "n_classes": 5}, loss={"name": "cross_entropy"})
    )
    assert trainer.info.task == "classification" and (trainer.info.n_features, trainer.info.n_outputs) == (7, 5)
    assert (trainer.model.in_features, trainer.model.out_features) == (7, 5)


@pytest.fixture
def npz_files(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randn(60, 3).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 1).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "val.npz", x=x[:12], y=y[:12])
    np.savez(tmp_path / "other.npz", features=x, target=y)
    return x, y


def test_npz_with_a_validation_file(npz_files):
    x, y = npz_files
    trainer = engine.setup(job(data={"name": "npz", "path": "train.npz", "val_path": "val.npz"}))
    assert torch.equal(trainer.loaders.x, torch.from_numpy(x))
    assert torch.equal(trainer.loaders.y, torch.from_numpy(y)[:, None])  # [N] regression targets become [N, 1]
    assert trainer.info == engine.DataInfo(3, 1, "regression", 60, 12, input_shape=(3,))
    result = trainer.fit()
    assert "val_loss" in result.metrics


def test_npz_with_named_arrays(npz_files):
    trainer = engine.setup(job(data={"name": "npz", "path": "other.npz", "x": "features", "y": "target"}))
    assert trainer.info.n_train == 60


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "npz"}, "data.path: give the path of the data file"),
        ({"name": "npz", "path": "missing.npz"}, "data.path: file 'missing.npz' does not exist"),
        (
            {"name": "npz", "path": "other.npz"},
            "data.path: file 'other.npz' has no array 'x' (it has: features, target)",
        ),
        ({"name": "npz", "path": "train.npz", "val_path": "nope.npz"}, "data.val_path: file 'nope.npz' does not exist"),
    ],
)
def test_npz_errors(npz_files, data, message, tmp_path):
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(data=data))
    assert message in str(raised.value).replace(f"{tmp_path}/", "")  # paths are recorded absolute


@pytest.fixture
def csv_files(tmp_path):
    rows = ["a,b,noise,label,price"] + [f"{i},{i % 3},{i * 7 % 5},{i % 2},{i * 1.5}" for i in range(20)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:6]) + "\n")
    (tmp_path / "bad.csv").write_text("a,label\n1,0\nx,1\n")
    (tmp_path / "semi.csv").write_text("a;label\n1;0\n2;1\n")


def test_csv_classification_with_feature_columns_and_a_validation_file(csv_files):
    trainer = engine.setup(
        job(
            data={"name": "csv", "path": "train.csv", "val_path": "val.csv", "target": "label", "features": ["a", "b"]},
            loss={"name": "cross_entropy"},
        )
    )
    assert trainer.info == engine.DataInfo(2, 2, "classification", 20, 5, input_shape=(2,))
    assert trainer.loaders.x[3].tolist() == [3.0, 0.0] and trainer.loaders.y.dtype == torch.long
    assert trainer.fit().metrics["val_accuracy"] >= 0


def test_csv_regression_uses_all_other_columns(csv_files):
    trainer = engine.setup(job(data={"name": "csv", "path": "train.csv", "target": "price"}))
    assert trainer.info == engine.DataInfo(4, 1, "regression", 20, 0, input_shape=(4,))
    assert trainer.loaders.y[:3, 0].tolist() == [0.0, 1.5, 3.0]


def test_csv_task_and_delimiter(csv_files):
    forced = engine.setup(job(data={"name": "csv", "path": "train.csv", "target": "label", "task": "regression"}))
    assert forced.info.task == "regression"
    semi = engine.setup(
        job(
            data={"name": "csv", "path": "semi.csv", "target": "label", "delimiter": ";"},
            loss={"name": "cross_entropy"},
        )
    )
    assert semi.info.n_train == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"path": "train.csv"}, "data.target: name the target column of the csv file"),
        ({"path": "train.csv", "target": "nope"}, "data: column 'nope' is not in 'train.csv' (columns: a, b, noise"),
        ({"path": "bad.csv", "target": "label"}, "data.path: 'bad.csv' line 3, column 'a' is 'x', not a number"),
        (
            {"path": "train.csv", "target": "price", "task": "classification"},
            "data.task = 'classification': the training targets are not whole numbers (e.g. ",
        ),
        (
            {"path": "train.csv", "target": "label", "task": "auto-ish"},
            "data.task: expected one of 'auto', 'regression', 'classification', 'binary', 'sequence', got 'auto-ish' "
            "(did you mean 'auto'?)",
        ),
    ],
)
def test_csv_errors(csv_files, data, message, tmp_path):
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(data={"name": "csv", **data}))
    assert message in str(raised.value).replace(f"{tmp_path}/", "")  # paths are recorded absolute


def test_negative_class_indices_are_rejected(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, -2, 1]))
    with pytest.raises(engine.ConfigError, match="data: class indices must be 0 or more, found -2"):
        engine.setup(job(data={"name": "npz", "path": "neg.npz"}, loss={"name": "cross_entropy"}))
