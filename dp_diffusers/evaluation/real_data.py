"""Real labelled images as ``uint8`` arrays: from an ``.npz``, a parquet file, a folder of parquet files or a Hub name.

Parquet files follow the Hugging Face ``datasets`` layout of ``ylecun/mnist`` (an ``image`` column of
``{bytes, path}`` structs and a ``label`` column), e.g. ``../shared/datasets/mnist/{train,test}.parquet``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserInputError
from .samples import load_npz, validate_images

_GRAY_MODES = ("1", "I", "I;16", "I;16B", "I;16L", "F", "LA", "La")


def _decode(cell) -> np.ndarray:
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            img = Image.open(io.BytesIO(cell["bytes"]))
        elif cell.get("path"):
            img = Image.open(cell["path"])
        else:
            raise UserInputError("An image cell has neither bytes nor path.")
    elif isinstance(cell, Image.Image):
        img = cell
    else:
        arr = np.asarray(cell)
        if arr.dtype != np.uint8:
            raise UserInputError(f"Image cells of dtype {arr.dtype} are not supported (expected PNG/JPEG or uint8).")
        return arr if arr.ndim == 3 else arr[..., None]
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[..., None]


def dataset_to_arrays(
    dataset, *, image_column: str, label_column: str, max_items: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A ``datasets.Dataset`` of images and labels -> ``(uint8 [N, H, W, C], int64 [N])`` (first ``max_items``).

    Images keep their size; grayscale stays one channel, other modes become RGB. PNG/JPEG bytes are decoded
    directly with PIL (faster than ``datasets``' per-row decoding).
    """
    import datasets

    if max_items is not None:
        dataset = dataset.select(range(min(int(max_items), len(dataset))))
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    images = [_decode(cell) for cell in dataset[image_column]]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserInputError(f"Images have different shapes {sorted(shapes)[:4]}; resize them to one size first.")
    labels = np.asarray(dataset[label_column])
    return validate_images(np.stack(images), labels, source="dataset")


def load_labelled_images(
    source: str | os.PathLike,
    *,
    split: str = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    max_items: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads labelled images as ``(uint8 [N, H, W, C], int64 [N])``, the first ``max_items`` if given.

    ``source`` is an ``.npz`` (see :func:`~dp_diffusers.evaluation.load_npz`), or anything
    :func:`dp_diffusers.data.load_image_dataset` reads: a ``.parquet`` file, a folder of parquet files named after
    their splits (``{split}.parquet``, ``{split}-*.parquet``, ``{split}/``), an image folder, a preset name or a
    Hub id (from the local cache when offline). ``split`` is ignored for single files.
    """
    from ..data import load_image_dataset

    source = os.fspath(source)
    if Path(source).suffix == ".npz":
        x, y = load_npz(source)
        return (x[:max_items], y[:max_items]) if max_items is not None else (x, y)
    loaded = load_image_dataset(source, split=split, image_column=image_column, label_column=label_column)
    if loaded.label_column is None:
        raise UserInputError(f"{loaded.source} has no label column; pass its name (`label_column`).")
    return dataset_to_arrays(
        loaded.dataset, image_column=loaded.image_column, label_column=loaded.label_column, max_items=max_items
    )


def is_single_file(source: str | os.PathLike) -> bool:
    """Whether ``source`` names one file (``.npz``/``.parquet``), which has no other splits to look for."""
    return Path(source).is_file() or Path(source).suffix in (".npz", ".parquet")
