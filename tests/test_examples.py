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
# name: (features, labels or None for values, expected task)
SHAPES = {
    "digits": (64, 10, "classification"),
    "breast_cancer": (30, 2, "binary"),
    "wine": (13, 3, "classification"),
    "diabetes": (10, None, "regression"),
}


def stand_in(path: Path, features: int, classes: int | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, features)).astype(np.float32) * 100
    y = rng.integers(0, classes, size=120) if classes else rng.integers(25, 347, size=120).astype(np.float64)
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_example_job_runs_with_its_task(name, tmp_path):
    features, classes, task = SHAPES[name]
    stand_in(tmp_path / "data.npz", features, classes)
    result = engine.run(
        EXAMPLES / f"{name}.toml", overrides=["epochs=2", f"data.path={tmp_path / 'data.npz'}", f"run_name={name}"]
    )
    assert result.config["inferred"]["task"] == task
    assert result.config["data"]["standardize"] is True
    assert (result.run_dir / "model.pt").is_file()
