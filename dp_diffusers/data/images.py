"""Decoding images into tensors: mode, square crop, resize, [-1, 1] floats, and the map-style torch dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..errors import UserInputError

if TYPE_CHECKING:  # loading.py imports this module
    from .loading import LoadedDataset


def open_image(value) -> Image.Image:
    """An undecoded ``datasets.Image`` value (``{"bytes", "path"}``) as a fully loaded PIL image."""
    import io

    data = value.get("bytes") if isinstance(value, dict) else None
    path = value.get("path") if isinstance(value, dict) else value
    image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    image.load()  # decodes the pixels: a truncated file fails here, not at open
    return image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:  # transparent pixels become black
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _to_uint8(image: Image.Image, *, resolution: int, channels: int, crop_at: float = 0.5) -> np.ndarray:
    """``image`` as a ``[C, resolution, resolution]`` uint8 array: mode converted, cropped to a square, resized.

    ``crop_at`` places the square along the longer side: 0 at its start, 0.5 in the center, 1 at its end."""
    image = _to_mode(image, channels)
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = round((w - side) * crop_at), round((h - side) * crop_at)
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _uint8_to_float(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def _check_channels(channels: int, resolution: int) -> None:
    if channels not in (1, 3):
        raise UserInputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    if resolution < 1:
        raise UserInputError(f"resolution must be positive, got {resolution}.")


@dataclass(frozen=True)
class _ImageTransform:
    resolution: int
    channels: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _uint8_to_float(_to_uint8(image, resolution=self.resolution, channels=self.channels))


def image_transform(*, resolution: int, channels: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor ``[channels, resolution, resolution]`` in [-1, 1].

    Converts to ``L`` (1 channel) or ``RGB`` (3), compositing transparency over black; center-crops non-square
    images to a square and resizes them (bicubic, antialiased when shrinking). The callable pickles, so it works
    in ``DataLoader`` workers.
    """
    _check_channels(channels, resolution)
    return _ImageTransform(resolution=resolution, channels=channels)


_IN_MEMORY_MAX_ROWS = 100_000
_IN_MEMORY_MAX_RESOLUTION = 64
_DECODE_BATCH = 1000
_MIN_PROGRESS = 5000


class ImageLabelDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``{"pixel_values": FloatTensor[C, H, W] in [-1, 1], "labels": LongTensor[]}``.

    ``labels`` is ``-1`` for unconditional data. With ``in_memory`` every image is decoded once up-front into a
    uint8 tensor (MNIST's 60,000 28x28 images: 47 MB); otherwise each item is decoded when indexed.

    Non-square images are cropped to a square: in the center with ``center_crop``, else at a random place drawn
    for each row from ``(crop_seed, row)`` (the same every time the row is read). ``flip`` mirrors every image
    left-right (the latent cache encodes both ways for ``--random_flip``).
    """

    def __init__(
        self,
        loaded: LoadedDataset,
        *,
        resolution: int,
        channels: int,
        in_memory: bool,
        center_crop: bool = True,
        crop_seed: int = 0,
        flip: bool = False,
    ):
        _check_channels(channels, resolution)
        self.center_crop, self.crop_seed, self.flip = center_crop, crop_seed, flip
        columns = [loaded.image_column] + ([loaded.label_column] if loaded.label_column is not None else [])
        self.dataset = loaded.dataset.select_columns(columns)
        self.image_column = loaded.image_column
        self.label_column = loaded.label_column
        self.resolution = resolution
        self.channels = channels
        self.in_memory = in_memory
        self._pixels: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        if in_memory:
            self._decode_all(loaded.source)

    def _decode_all(self, source: str) -> None:
        from tqdm.auto import tqdm

        n = len(self.dataset)
        pixels = torch.empty((n, self.channels, self.resolution, self.resolution), dtype=torch.uint8)
        labels = torch.full((n,), -1, dtype=torch.long)
        with tqdm(total=n, desc=f"Decoding {source}", unit="img", disable=n < _MIN_PROGRESS) as bar:
            for start in range(0, n, _DECODE_BATCH):
                batch = self.dataset[start : start + _DECODE_BATCH]
                for j, image in enumerate(batch[self.image_column]):
                    pixels[start + j] = torch.from_numpy(self._pixels_of(image, start + j))
                if self.label_column is not None:
                    chunk = torch.as_tensor(np.asarray(batch[self.label_column], dtype=np.int64))
                    labels[start : start + len(chunk)] = chunk
                bar.update(len(batch[self.image_column]))
        self._pixels, self._labels = pixels, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        """A batch of rows with one read of the underlying table (torch's DataLoader calls this when present)."""
        indices = [int(i) + (len(self) if int(i) < 0 else 0) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"index {bad[0]} out of range for {len(self)} items")
        if self._pixels is not None:
            pixels = [_uint8_to_float(self._pixels[i]) for i in indices]
            labels = [self._labels[i].clone() for i in indices]
        else:
            batch = self.dataset[indices] if indices else {self.image_column: []}
            raw = batch[self.label_column] if self.label_column is not None else [-1] * len(indices)
            images = batch[self.image_column]
            pixels = [_uint8_to_float(self._pixels_of(im, i)) for i, im in zip(indices, images, strict=True)]
            labels = [torch.tensor(label, dtype=torch.long) for label in raw]
        return [
            {"pixel_values": x.flip(-1) if self.flip else x, "labels": y} for x, y in zip(pixels, labels, strict=True)
        ]

    def _pixels_of(self, image: Image.Image, index: int) -> np.ndarray:
        crop_at = 0.5 if self.center_crop else float(np.random.default_rng([self.crop_seed, index]).random())
        return _to_uint8(image, resolution=self.resolution, channels=self.channels, crop_at=crop_at)

    def flipped(self) -> ImageLabelDataset:
        """The same rows mirrored left-right (shares the decoded pixels)."""
        import copy

        other = copy.copy(self)
        other.flip = not self.flip
        return other


def as_torch_dataset(
    loaded: LoadedDataset,
    *,
    resolution: int,
    channels: int,
    in_memory: bool | None = None,
    center_crop: bool = True,
    crop_seed: int = 0,
) -> ImageLabelDataset:
    """A map-style ``torch`` dataset of ``{"pixel_values", "labels"}`` items (see ``ImageLabelDataset``).

    ``in_memory=None`` decodes everything up-front (with a progress bar) when there are at most 100,000 images of
    side at most 64, the case of MNIST, CIFAR-10 and the digit sets, and decodes lazily per item otherwise.
    """
    if in_memory is None:
        in_memory = len(loaded.dataset) <= _IN_MEMORY_MAX_ROWS and resolution <= _IN_MEMORY_MAX_RESOLUTION
    return ImageLabelDataset(
        loaded,
        resolution=resolution,
        channels=channels,
        in_memory=in_memory,
        center_crop=center_crop,
        crop_seed=crop_seed,
    )
