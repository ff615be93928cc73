"""Export scikit-learn's bundled data sets to the .npz files the example jobs read.

    pip install scikit-learn
    python bench/examples/export_sklearn.py        # writes bench/examples/data/<name>.npz

digits (8x8 images, 10 classes), breast_cancer (30 features, 2 classes), wine (13 features,
3 classes) and diabetes (10 features, a regression target); and digits again as images,
N x 1 x 8 x 8 (digits_images.npz, for the convolutional network of digits_cnn.toml). The data is
not shipped with the project; scikit-learn carries it.
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
        if name == "digits":  # the same samples in the same order, as one-channel images
            images = folder / "digits_images.npz"
            np.savez(images, x=x.reshape(len(x), 1, 8, 8).astype(np.float32), y=y)
            written.append(images)
            print(f"{images}: x {(len(x), 1, 8, 8)}, y {y.shape} {y.dtype}")
    return written


if __name__ == "__main__":
    export()
