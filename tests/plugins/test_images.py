"""plugins/images.py: arrays of images read as N x C x H x W (a channel axis given to N x H x W,
flat rows reshaped by `shape`), a .npy of images for `predict`, a Dataset of images; and batching's
standardization of each channel (``data.standardize = "channels"``), saved with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.cli import main
from tests.helpers import bar_images, job


@pytest.fixture
def bars(tmp_path: Path) -> Path:
    """Three files of bar images, N x 1 x 8 x 8: training, validation and test."""
    for name, seed, n in (("train", 0, 60), ("val", 1, 20), ("test", 2, 10)):
        x, y = bar_images(seed, n)
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    return tmp_path


def images_job(path: Path, **data) -> dict:
    return job(
        data={"name": "images", "path": str(path), "batch_size": 16, **data},
        model={"name": "cnn", "channels": [4], "hidden": [8]},
        loss={"name": "cross_entropy"},
    )


def test_images_with_validation_and_test_files(bars):
    trainer = engine.setup(
        images_job(bars / "train.npz", val_path=str(bars / "val.npz"), test_path=str(bars / "test.npz"))
    )
    info = trainer.info
    assert (info.input_shape, info.n_features, info.n_outputs) == ((1, 8, 8), 8, 3)
    assert (info.n_train, info.n_val, info.n_test) == (60, 20, 10)
    assert torch.equal(trainer.loaders.x, torch.from_numpy(bar_images(0, 60)[0]))  # as stored
    assert trainer.config["inferred"]["input_shape"] == (1, 8, 8)


@pytest.mark.parametrize(
    ("stored", "shape"),
    [
        (lambda x: x[:, 0], ()),  # N x H x W: one channel
        (lambda x: x.reshape(len(x), 64), (1, 8, 8)),  # rows of 64 pixels
        (lambda x: x.reshape(len(x), 8, 8), (8, 8)),
        (lambda x: x.reshape(len(x), 4, 16), (1, 8, 8)),  # any layout of as many values
    ],
)
def test_images_stored_otherwise_are_read_as_n_c_h_w(tmp_path, stored, shape):
    x, y = bar_images(0, 30)
    np.savez(tmp_path / "other.npz", x=stored(x), y=y)
    trainer = engine.setup(images_job(tmp_path / "other.npz", shape=list(shape)))
    assert trainer.info.input_shape == (1, 8, 8)
    assert torch.equal(trainer.loaders.x, torch.from_numpy(x))


@pytest.mark.parametrize(
    ("x", "data", "message"),
    [
        (
            np.zeros((5, 64)),
            {},
            "data: the arrays of '{file}' have shape [5, 64], not images (N, C, H, W or N, H, W); "
            "data.shape = [C, H, W] reshapes samples of as many values",
        ),
        (
            np.zeros((5, 63)),
            {"shape": [1, 8, 8]},
            "data.shape: an image of [1, 8, 8] is 64 values, but the samples of '{file}' have shape [63]",
        ),
        (np.zeros((5, 64)), {"shape": [64]}, "data.shape: an image is C, H, W (or H, W for one channel), got [64]"),
        (np.zeros((5, 64)), {"x": "pixels"}, "data.path: file '{file}' has no array 'pixels' (it has: x, y)"),
        (np.array(["a"] * 5), {}, "data.path: array 'x' of '{file}' holds <U1 values, not numbers"),
    ],
)
def test_images_that_do_not_fit_say_why(tmp_path, x, data, message):
    file = tmp_path / "bad.npz"
    np.savez(file, x=x, y=np.zeros(5, dtype=np.int64))
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(images_job(file, **data))
    assert str(raised.value) == message.format(file=file)


def test_a_npy_file_holds_inputs_alone(tmp_path, bars):
    np.save(tmp_path / "x.npy", bar_images(0, 5)[0])
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(images_job(tmp_path / "x.npy"))
    assert str(raised.value) == (
        f"data.path: '{tmp_path / 'x.npy'}' holds one array; labelled images are a .npz file with arrays 'x' and 'y'"
    )
    with pytest.raises(engine.ConfigError, match=r"^data.path: '.*x.npy' is a .npy file: one array, the inputs"):
        engine.setup({**images_job(tmp_path / "x.npy"), "data": {"name": "npy", "path": str(tmp_path / "x.npy")}})
    with pytest.raises(engine.ConfigError, match=r"^data.path: file '.*missing.npz' does not exist$"):
        engine.setup(images_job(tmp_path / "missing.npz"))


def test_a_dataset_of_images_is_batched_and_standardized_by_channel_as_arrays_are(tmp_path):
    x, y = bar_images(42, 48)  # bars_dataset's, drawn with the run's seed
    np.savez(tmp_path / "bars.npz", x=x, y=y)
    arrays = engine.setup(images_job(tmp_path / "bars.npz", standardize="channels"))
    dataset = engine.setup(
        {**images_job(tmp_path / "bars.npz"), "data": {"name": "tests.helpers:bars_dataset", "standardize": "channels"}}
    )
    assert dataset.info.input_shape == arrays.info.input_shape == (1, 8, 8)
    for trainer in (arrays, dataset):
        transform = trainer.loaders.input_transform
        assert transform.name == "standardize_channels" and transform.module.mean.shape == (1, 1, 1)
        torch.testing.assert_close(transform.module.mean, torch.tensor(x.mean(), dtype=torch.float32).reshape(1, 1, 1))
        torch.testing.assert_close(transform.module.std, torch.tensor(x.std(), dtype=torch.float32).reshape(1, 1, 1))


def test_standardizing_each_channel_uses_the_training_split_and_is_saved_with_the_model(tmp_path):
    x, y = bar_images(0, 80, channels=3)
    x *= np.array([1.0, 10.0, 100.0], dtype=np.float32).reshape(1, 3, 1, 1)  # channels far apart
    np.savez(tmp_path / "colour.npz", x=x, y=y)
    trainer = engine.setup(images_job(tmp_path / "colour.npz", standardize="channels", val_fraction=0.25))
    train = trainer.loaders.x.double()
    module = trainer.loaders.input_transform.module
    assert module.mean.shape == (3, 1, 1) and len(train) == 60
    torch.testing.assert_close(module.mean.reshape(3), train.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(module.std.reshape(3), train.std(dim=(0, 2, 3), correction=0).float())
    scaled = module(trainer.loaders.x)
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    result = trainer.fit()
    assert result.config["inferred"]["input_transform"] == "standardize_channels"
    loaded = engine.load(result.run_dir)  # rebuilt from config.toml: raw pixels in
    with torch.inference_mode():
        torch.testing.assert_close(loaded(torch.from_numpy(x)), result.model.eval()(torch.from_numpy(x)))


def test_standardizing_channels_of_rows_of_features_is_refused():
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(data={"name": "classification", "n_samples": 20, "standardize": "channels"}))
    assert str(raised.value) == (
        "data.standardize = 'channels': the samples have shape (20,), not channels of images (C, H, W)"
    )


def test_predict_reads_a_npy_of_images_and_refuses_another_shape(tmp_path, bars, capsys):
    result = engine.run({**images_job(bars / "train.npz", standardize="channels"), "epochs": 2})
    x = bar_images(5, 12)[0]
    np.save(tmp_path / "new.npy", x[:, 0])  # N x H x W: given its channel axis by `npy`
    argv = ["predict", str(result.run_dir), "--data", "new.npy", "--out", "p.npz", "--backend", "eager"]
    assert main(argv) == 0
    written = dict(np.load(tmp_path / "p.npz"))
    with torch.inference_mode():
        expected = torch.softmax(engine.load(result.run_dir)(torch.from_numpy(x)), dim=-1)
    torch.testing.assert_close(torch.from_numpy(written["probability"]), expected)
    assert np.array_equal(written["class"], expected.argmax(-1).numpy())
    np.savez(tmp_path / "flat.npz", x=x.reshape(12, 64), y=np.zeros(12, dtype=np.int64))
    capsys.readouterr()
    assert main([*argv[:3], "flat.npz", *argv[4:]]) == 2
    assert capsys.readouterr().err == (
        f"error: --data 'flat.npz': samples of shape (64,), but run '{result.run_dir}' was trained on samples of "
        "shape (1, 8, 8)\n"
    )
    # Read by `images`, whose shape makes rows of 64 pixels the run's images.
    assert main([*argv[:3], "flat.npz", *argv[4:], "--set", "data.name=images", "--set", "data.shape=[1,8,8]"]) == 0
    assert np.array_equal(np.load(tmp_path / "p.npz")["probability"], written["probability"])
