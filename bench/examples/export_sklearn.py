"""Export scikit-learn's bundled data sets to the .npz files the example jobs read.

    pip install scikit-learn
    python bench/examples/export_sklearn.py        # writes bench/examples/data/<name>.npz

digits (8x8 images, 10 classes), breast_cancer (30 features, 2 classes), wine (13 features,
3 classes) and diabetes (10 features, a regression target). The data is not shipped with the
project; scikit-learn carries it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SETS = {
    "digits": "load_digits",
    "breast_cancer": "load_breast_cancer",
    "wine": "load_wine",
    "diabetes": "load_diabetes",
}


def export(folder: Path = HERE / "data") -> list[Path]:
    import sklearn.datasets

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, loader in SETS.items():
        x, y = getattr(sklearn.datasets, loader)(return_X_y=True)
        path = folder / f"{name}.npz"
        np.savez(path, x=x.astype(np.float32), y=y)
        written.append(path)
        print(f"{path}: x {x.shape}, y {y.shape} {y.dtype}")
    return written


if __name__ == "__main__":
    export()
