"""Built-in image data: arrays of images from ``.npz`` files (``images``), and a ``.npy`` file of
images for `predict` (``npy``, named after the suffix it reads).

Images are N x C x H x W arrays, or N x H x W (one channel, given its axis here); ``shape``
reshapes samples stored otherwise (rows of 64 pixels: ``shape = [1, 8, 8]``), in C, H, W
order. Pixels keep their values (0 to 255 for 8-bit images, as float32): ``data.standardize =
"channels"`` scales each channel by the training split's statistics inside the model, so that
`predict` and `evaluate` take raw pixels too. A ``torch.utils.data.Dataset`` of C x H x W images
comes in by reference (``data.name = "package.module:factory"``) and is batched the same way.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np

import engine

Dimension = Annotated[int, engine.Range(ge=1)]


def images(
    path: engine.FilePath = "",
    val_path: engine.FilePath = "",
    test_path: engine.FilePath = "",
    x: str = "x",
    y: str = "y",
    shape: tuple[Dimension, ...] = (),
    labelled: bool = True,
) -> Any:
    """The images `x` and labels `y` of a ``.npz`` file (and of `val_path` for validation,
    `test_path` for the test at the end); the images alone when not `labelled`, from a ``.npz``
    or a ``.npy`` file. `shape`: one image's (C, H, W or H, W), for samples stored in another
    shape with as many values."""
    if len(shape) not in (0, 2, 3):
        raise engine.ConfigError(f"data.shape: an image is C, H, W (or H, W for one channel), got {list(shape)}")
    if not labelled:
        return as_images(read(path, "path", (x,))[0], shape, path)
    splits = {"train": (path, "path"), "val": (val_path, "val_path"), "test": (test_path, "test_path")}
    loaded = {}
    for split, (file, key) in splits.items():
        if file or split == "train":
            pixels, labels = read(file, key, (x, y))
            loaded[split] = (as_images(pixels, shape, file), labels)
    return loaded if len(loaded) > 1 else loaded["train"]


def npy(path: engine.FilePath = "", shape: tuple[Dimension, ...] = (), labelled: bool = True) -> Any:
    """The images of a ``.npy`` file (one array: inputs without labels), for `predict`."""
    if labelled:
        raise engine.ConfigError(
            f"data.path: '{path}' is a .npy file: one array, the inputs; labelled data is a .npz file "
            '(data.name = "images" or "npz", arrays x and y)'
        )
    return images(path, shape=shape, labelled=False)


def read(file: str, key: str, names: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays `names` of a ``.npz`` file, or a ``.npy`` file's one array when the inputs
    alone are read; numbers, checked, or a ConfigError naming the key and file."""
    if not file:
        raise engine.ConfigError(f"data.{key}: give the path of the images file")
    if not Path(file).is_file():
        raise engine.ConfigError(f"data.{key}: file '{file}' does not exist")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise engine.ConfigError(
            f"data.{key}: '{file}' is not a readable .npz or .npy file: {engine.one_line(error)}"
        ) from None
    if isinstance(loaded, np.ndarray):
        if len(names) > 1:
            raise engine.ConfigError(
                f"data.{key}: '{file}' holds one array; labelled images are a .npz file with arrays "
                f"{' and '.join(map(repr, names))}"
            )
        return [numeric(loaded, file, key, "its array")]
    with loaded:
        missing = [name for name in names if name not in loaded.files]
        if missing:
            raise engine.ConfigError(
                f"data.{key}: file '{file}' has no array {missing[0]!r} (it has: {', '.join(loaded.files)})"
            )
        try:
            return [numeric(loaded[name], file, key, f"array {name!r}") for name in names]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # pickled objects, a cut file
            raise engine.ConfigError(f"data.{key}: '{file}' cannot be read: {engine.one_line(error)}") from None


def numeric(array: np.ndarray, file: str, key: str, what: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise engine.ConfigError(f"data.{key}: {what} of '{file}' holds {array.dtype} values, not numbers")
    return array


def as_images(pixels: np.ndarray, shape: tuple[int, ...], file: str) -> np.ndarray:
    """`pixels` as N x C x H x W: reshaped to `shape` when given, a channel axis added to N x H x W."""
    if shape:
        per_sample = math.prod(pixels.shape[1:]) if pixels.ndim else 0
        if pixels.ndim < 2 or per_sample != math.prod(shape):
            raise engine.ConfigError(
                f"data.shape: an image of {list(shape)} is {math.prod(shape)} values, but the samples of '{file}' "
                f"have shape {list(pixels.shape[1:])}"
            )
        pixels = pixels.reshape(len(pixels), *shape)
    if pixels.ndim == 3:
        return pixels[:, None]
    if pixels.ndim != 4:
        raise engine.ConfigError(
            f"data: the arrays of '{file}' have shape {list(pixels.shape)}, not images (N, C, H, W or N, H, W); "
            "data.shape = [C, H, W] reshapes samples of as many values"
        )
    return pixels


@engine.hookimpl
def register_components():
    return {"data": {"images": images, "npy": npy}}
