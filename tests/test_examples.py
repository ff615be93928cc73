"""bench/examples: the scikit-learn job files run as written (on stand-in data of the same shapes
and kinds: the real sets come from scikit-learn, which CI does not install), and the task each one
gets is the one its comment says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine
from tests.conftest import REPO

EXAMPLES = REPO / "bench" / "examples"
# name: (one sample's shape, labels or None for values, expected task)
SHAPES = {
    "digits": ((64,), 10, "classification"),
    "digits_cnn": ((1, 8, 8), 10, "classification"),
    "breast_cancer": ((30,), 2, "binary"),
    "wine": ((13,), 3, "classification"),
    "diabetes": ((10,), None, "regression"),
}


def stand_in(path: Path, shape: tuple[int, ...], classes: int | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, *shape)).astype(np.float32) * 100
    y = rng.integers(0, classes, size=120) if classes else rng.integers(25, 347, size=120).astype(np.float64)
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_example_job_runs_with_its_task(name, tmp_path):
    shape, classes, task = SHAPES[name]
    stand_in(tmp_path / "data.npz", shape, classes)
    result = engine.run(
        EXAMPLES / f"{name}.toml", overrides=["epochs=2", f"data.path={tmp_path / 'data.npz'}", f"run_name={name}"]
    )
    assert result.config["inferred"]["task"] == task
    assert result.config["inferred"]["input_shape"] == shape
    assert result.config["data"]["standardize"] in (True, "channels")
    assert (result.run_dir / "model.pt").is_file()
