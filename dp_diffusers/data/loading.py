"""Loading image data sets (presets, Hub ids, local folders and parquet files) and turning them into tensors."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from ..errors import UserInputError, first_line
from .printed_digits import make_printed_digits
from .sklearn_digits import load_sklearn_digits


@dataclass(frozen=True)
class DatasetPreset:
    """A named data set: where it lives and how to read it.

    ``hub_id`` is ``None`` for the embedded sets (``digits``, ``printed_digits``). ``label_column`` is ``None`` for
    unconditional data. ``class_names`` names the label ids of a column that is not a ``ClassLabel`` (e.g. a boolean
    attribute); ``None`` keeps the column's own names.
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str | None
    resolution: int
    channels: int
    split: str = "train"
    description: str = ""
    class_names: tuple[str, ...] | None = None


PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset(
            name="digits",
            hub_id=None,
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 28x28 (embedded, private default)",
        ),
        DatasetPreset(
            name="printed_digits",
            hub_id=None,
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="digits rendered from matplotlib's fonts, MNIST-style (generated, public; stands in for SVHN)",
        ),
        DatasetPreset(
            name="mnist",
            hub_id="ylecun/mnist",
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="MNIST handwritten digits, 60,000 train / 10,000 test, 28x28 grayscale",
        ),
        DatasetPreset(
            name="fashion_mnist",
            hub_id="zalando-datasets/fashion_mnist",
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="Fashion-MNIST clothing images, 60,000 train / 10,000 test, 28x28 grayscale, 10 classes",
        ),
        DatasetPreset(
            name="cifar10",
            hub_id="uoft-cs/cifar10",
            image_column="img",
            label_column="label",
            resolution=32,
            channels=3,
            description="CIFAR-10 natural images, 50,000 train / 10,000 test, 32x32 RGB, 10 classes",
        ),
        DatasetPreset(
            name="celeba",
            hub_id="flwrlabs/celeba",
            image_column="image",
            label_column="Male",
            resolution=32,
            channels=3,
            description=(
                "CelebA aligned faces (162,770 train / 19,867 valid / 19,962 test, 178x218 RGB, center-cropped and "
                "resized to 32x32); the class is the boolean attribute 'Male' (pass --label_column for another of "
                "the 40 attributes, e.g. Smiling)"
            ),
            class_names=("female", "male"),
        ),
    )
}


@dataclass
class LoadedDataset:
    """A loaded data set and how to read it.

    ``id2label`` maps the label ids found in ``label_column`` (always a ``ClassLabel`` after loading) to names; it
    is empty when the data set is unconditional (``label_column`` is ``None``).
    """

    dataset: datasets.Dataset
    image_column: str
    label_column: str | None
    id2label: dict[int, str]
    source: str
    preset: DatasetPreset | None = None
    #: Where the label set (``id2label``) was declared; it is treated as public (never read from private labels).
    label_set_source: str | None = None


_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
_SPLIT_RE = re.compile(rf"^({'|'.join(_SPLIT_NAMES)})(?:[-_.].*)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _presets_list() -> str:
    return ", ".join(PRESETS)


def _file_split(path: Path, root: Path) -> str | None:
    """The split a parquet file belongs to by its name (``train-0000.parquet``) or a folder (``train/0.parquet``)."""
    parts = path.relative_to(root).parts
    match = _SPLIT_RE.match(Path(parts[-1]).stem)
    if match:
        return match.group(1)
    for part in reversed(parts[:-1]):
        if part in _SPLIT_NAMES:
            return part
    return None


def _load_parquet(files: list[str], *, source: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    except Exception as e:
        raise UserInputError(f"could not read the parquet data {source!r} ({first_line(e)}).") from e


def _load_local_dir(root: Path, split: str) -> tuple[datasets.Dataset, str]:
    parquet = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if parquet:
        by_split = {p: _file_split(p, root) for p in parquet}
        found = sorted({s for s in by_split.values() if s is not None})
        if split in found:
            files = [p for p, s in by_split.items() if s == split]
        elif found:
            raise UserInputError(
                f"folder '{root}' has no '{split}' split (found: {', '.join(found)}); pass `split`=..."
            )
        else:  # no split in the file names: all files are one split
            files = parquet
        source = f"{root} ({split})" if found else str(root)
        return _load_parquet([str(p) for p in files], source=source), source
    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(root), split=split)
    except Exception as e:
        raise UserInputError(
            f"could not load folder '{root}' as an image folder, split '{split}' ({first_line(e)}); it should hold "
            "parquet files or images in one subfolder per class (optionally under train/ and test/)."
        ) from e
    return dataset, f"{root} ({split})"


def _load_hub(hub_id: str, split: str, cache_dir: str | None = None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise UserInputError(
            f"could not load '{hub_id}' (split '{split}') from the Hugging Face Hub ({first_line(e)}); check the "
            "id, the split (`split`) and the network, or pass a local folder or .parquet file."
        ) from e


def _guess_image_column(dataset: datasets.Dataset) -> str | None:
    for name in ("image", "img"):
        if name in dataset.column_names:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return None


def _guess_label_column(dataset: datasets.Dataset) -> str | None:
    for name in ("label", "labels"):
        if name in dataset.column_names:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return None


#: What works when class-conditional training meets images without labels.
NO_LABELS_HINT = (
    "put the images in one subfolder per class (an image folder), add a metadata.csv or metadata.jsonl beside them "
    "with a label column (and `class_names`), or start from an unconditional base model (an LDMPipeline, "
    "`pretrained_model_name_or_path`)"
)


def no_labels_error(source: str) -> UserInputError:
    return UserInputError(
        f"the private data '{source}' has no labels, and this base model is class-conditional: {NO_LABELS_HINT}."
    )


def _check_column(dataset: datasets.Dataset, column: str, *, source: str, flag: str) -> None:
    if (
        column not in dataset.column_names
        and flag == "label_column"
        and all(isinstance(f, datasets.Image) for f in dataset.features.values())
    ):
        raise no_labels_error(source)  # nothing but images: naming another column would not help
    if column not in dataset.column_names:
        raise UserInputError(
            f"dataset '{source}' has no column '{column}' (columns: {', '.join(dataset.column_names)}); "
            f"pass `{flag}`=..."
        )


def _ensure_image_feature(dataset: datasets.Dataset, column: str, *, source: str) -> datasets.Dataset:
    if isinstance(dataset.features[column], datasets.Image):
        return dataset
    try:  # e.g. a {bytes, path} struct or file paths written without the `datasets` metadata
        return dataset.cast_column(column, datasets.Image())
    except Exception as e:
        raise UserInputError(
            f"column '{column}' of dataset '{source}' does not hold images ({dataset.features[column]}); "
            "pass `image_column`=..."
        ) from e


def _encode_labels(
    dataset: datasets.Dataset, column: str, *, source: str, class_names: tuple[str, ...] | None, declared_by: str
) -> tuple[datasets.Dataset, dict[int, str], str]:
    """Makes ``column`` a ``ClassLabel`` over a *declared* label set; returns the data set, ``id2label`` and where
    the label set came from.

    The label set is public input, never computed from the private data: which classes occur, and so which id each
    class gets, would otherwise change when one example is added or removed (one example of a rare class renumbers
    every class after it), and ``id2label`` is published with the model. It comes from the column's own ``ClassLabel``
    feature (a schema, e.g. ``imagefolder``'s folder names), a boolean column, or ``class_names`` (a preset's or the
    caller's, ``declared_by``). Integer labels are ids into ``class_names``; string labels are names in it.
    """
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        if class_names is not None and list(class_names) != list(feature.names):
            raise UserInputError(
                f"dataset '{source}' declares the classes {list(feature.names)} in column '{column}', but "
                f"{declared_by} says {list(class_names)}: drop `class_names` or make them equal."
            )
        return dataset, dict(enumerate(feature.names)), "the dataset's ClassLabel feature (its declared schema)"
    if not isinstance(feature, datasets.Value) or not (
        feature.dtype in ("bool", "string", "large_string") or feature.dtype.startswith(("int", "uint", "float"))
    ):
        raise UserInputError(
            f"column '{column}' of dataset '{source}' holds {feature}, not class labels; pass `label_column`=..."
        )
    if feature.dtype == "bool":
        names = list(class_names) if class_names is not None else ["False", "True"]
        if len(names) != 2:
            raise UserInputError(f"the boolean column '{column}' has 2 classes, but {declared_by} names {len(names)}.")
        origin = "the boolean column's two values" if class_names is None else declared_by
    elif class_names is None:
        raise UserInputError(
            f"label column '{column}' of dataset '{source}' declares no label set (it is not a datasets ClassLabel), "
            "and reading one from the private labels would leak which classes occur: declare the classes with "
            "`class_names`=name0,name1,... (or a file, one name per line; integer labels are indices into it)."
        )
    else:
        names, origin = list(class_names), declared_by
    values = dataset.select_columns([column]).with_format("arrow")[:][column].to_pylist()
    if any(v is None for v in values):
        raise UserInputError(f"label column '{column}' of dataset '{source}' has missing values.")
    if feature.dtype == "bool":
        ids = [int(v) for v in values]
    elif feature.dtype in ("string", "large_string"):
        lookup = {name: i for i, name in enumerate(names)}
        ids = [lookup.get(v, -1) for v in values]
    else:
        if feature.dtype.startswith("float") and not all(float(v).is_integer() for v in values):
            raise UserInputError(
                f"column '{column}' of dataset '{source}' holds non-integer numbers, not class labels; "
                "pass `label_column`=..."
            )
        ids = [int(v) if 0 <= v < len(names) else -1 for v in values]
    outside = sum(i < 0 for i in ids)
    if outside:
        kind = "names" if feature.dtype in ("string", "large_string") else f"ids 0..{len(names) - 1}"
        raise UserInputError(
            f"{outside} example(s) of dataset '{source}' have a label outside the {len(names)} declared classes "
            f"({kind} of {declared_by}): fix the labels or the class names."
        )
    ids = np.asarray(ids, dtype=np.int64)
    dataset = dataset.remove_columns([column]).add_column(column, ids, feature=datasets.ClassLabel(names=names))
    return dataset, dict(enumerate(names)), origin


def parse_class_names(spec: str | None) -> tuple[str, ...] | None:
    """``"ant,bee,cat"`` or the path of a text file with one name per line -> ``("ant", "bee", "cat")``."""
    if spec is None or not str(spec).strip():
        return None
    path = Path(str(spec)).expanduser()
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [part.strip() for part in str(spec).split(",")]
    if not names or any(not n for n in names):
        raise UserInputError(f"`class_names`={spec!r}: give non-empty names separated by commas, or a file.")
    if len(set(names)) != len(names):
        raise UserInputError(f"`class_names`={spec!r} names a class twice.")
    return tuple(names)


def load_image_dataset(
    name_or_path: str | None = None,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
    cache_dir: str | None = None,
    num_printed_digits: int = 10000,
    seed: int = 0,
) -> LoadedDataset:
    """Loads an image data set by preset name, local path or Hub id; never touches the network for local data.

    - ``None`` or ``"digits"``: scikit-learn's embedded handwritten digits (the default private data).
    - ``"printed_digits"``: ``num_printed_digits`` rendered digits (public), generated with ``seed``.
    - a preset name (see ``PRESETS``): ``datasets.load_dataset(preset.hub_id, split=split)``.
    - a local folder: its parquet files (searched recursively; files or folders named after splits, e.g.
      ``train-*.parquet`` or ``test/``, select ``split``), else an image folder (``imagefolder``, one subfolder per
      class).
    - a ``.parquet`` file, or several separated by commas.
    - a Hub id ``owner/name``: ``datasets.load_dataset(name_or_path, split=split)``.

    ``image_column`` and ``label_column`` override the preset's (default: ``image``/``img`` or the first image
    column, and ``label``/``labels`` or the first ``ClassLabel`` column; no label column means unconditional).
    The label set is declared, never read from the private labels: a ``ClassLabel`` column (``imagefolder``'s
    folder names included), a boolean column, a preset's names, or ``class_names`` (integer labels index it, string
    labels are names in it); a plain column without one is refused. ``id2label`` holds it.
    Every failure the user can fix raises a one-line ``UserInputError``.
    """
    preset = None
    name = name_or_path.strip() if isinstance(name_or_path, str) else name_or_path
    if name is None or name == "" or name in ("digits", "printed_digits"):
        preset = PRESETS[name or "digits"]
        if split != "train":
            raise UserInputError(
                f"the embedded data set '{preset.name}' has only a 'train' split, not '{split}'; pass `split`=train."
            )
        if preset.name == "digits":
            dataset, source = load_sklearn_digits(), "scikit-learn digits (embedded, 1,797 images)"
        else:
            dataset = make_printed_digits(num_printed_digits, seed=seed)
            source = f"printed digits (rendered from matplotlib's fonts, {num_printed_digits} images, seed {seed})"
    elif name in PRESETS:
        preset = PRESETS[name]
        dataset, source = _load_hub(preset.hub_id, split, cache_dir), f"{preset.hub_id} ({split})"
    else:
        path = Path(name).expanduser()
        parts = [Path(p.strip()).expanduser() for p in name.split(",") if p.strip()]
        if path.is_dir():
            dataset, source = _load_local_dir(path, split)
        elif parts and all(p.suffix == ".parquet" for p in parts):
            missing = [str(p) for p in parts if not p.is_file()]
            if missing:
                raise UserInputError(f"no such parquet file: {', '.join(missing)}")
            source = ",".join(str(p) for p in parts)
            dataset = _load_parquet([str(p) for p in parts], source=source)
        elif path.exists():
            raise UserInputError(f"'{name}' is neither a folder nor a .parquet file; pass a folder or .parquet file.")
        elif name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
            raise UserInputError(f"no such file or folder: '{name}'")
        elif _HUB_ID_RE.match(name):
            dataset, source = _load_hub(name, split, cache_dir), f"{name} ({split})"
        else:
            raise UserInputError(
                f"unknown dataset '{name}': use a preset ({_presets_list()}), a Hub id 'owner/name', a local folder "
                "or a .parquet file."
            )

    if isinstance(dataset, datasets.DatasetDict):  # cannot happen with split=...; guard for odd loaders
        raise UserInputError(f"dataset '{source}' has several splits; pass `split`=...")

    if image_column is None:
        image_column = preset.image_column if preset is not None else _guess_image_column(dataset)
        if image_column is None:
            raise UserInputError(
                f"dataset '{source}' has no image column (columns: {', '.join(dataset.column_names)}); "
                "pass `image_column`=..."
            )
    _check_column(dataset, image_column, source=source, flag="image_column")
    dataset = _ensure_image_feature(dataset, image_column, source=source)

    if label_column is None:
        label_column = preset.label_column if preset is not None else _guess_label_column(dataset)
    id2label: dict[int, str] = {}
    label_set_source = None
    if label_column is not None:
        _check_column(dataset, label_column, source=source, flag="label_column")
        if label_column == image_column:
            raise UserInputError(f"the label column '{label_column}' is the image column; pass `label_column`=...")
        declared_by = "the class names given as input (`class_names`)"
        if class_names is None and preset is not None and label_column == preset.label_column:
            class_names, declared_by = preset.class_names, f"the preset '{preset.name}'"
        dataset, id2label, label_set_source = _encode_labels(
            dataset,
            label_column,
            source=source,
            class_names=tuple(class_names) if class_names is not None else None,
            declared_by=declared_by,
        )
    elif class_names is not None:
        raise UserInputError(f"class names were given, but dataset '{source}' has no label column (`label_column`).")

    return LoadedDataset(
        dataset=dataset,
        image_column=image_column,
        label_column=label_column,
        id2label=id2label,
        source=source,
        preset=preset,
        label_set_source=label_set_source,
    )


def _open(value) -> Image.Image:
    """An undecoded ``datasets.Image`` value (``{"bytes", "path"}``) as a fully loaded PIL image."""
    import io

    data = value.get("bytes") if isinstance(value, dict) else None
    path = value.get("path") if isinstance(value, dict) else value
    image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    image.load()  # decodes the pixels: a truncated file fails here, not at open
    return image


def drop_unreadable_images(loaded: LoadedDataset, *, skip_bad_images: bool) -> tuple[LoadedDataset, int]:
    """Decodes every image once. Unreadable ones (corrupt, truncated, not an image) stop the run with a one-line
    error giving their count, or with ``skip_bad_images`` are left out; returns the data set and how many were left
    out.

    Which images are left out depends only on each file on its own (whether it decodes), never on the others."""
    from tqdm.auto import tqdm

    column = loaded.image_column
    raw = loaded.dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    bad: list[int] = []
    first_error = None
    n = len(raw)
    with tqdm(total=n, desc="Checking images", unit="img", disable=n < _MIN_PROGRESS) as bar:
        for start in range(0, n, _DECODE_BATCH):
            for j, value in enumerate(raw[start : start + _DECODE_BATCH][column]):
                try:
                    _open(value)
                except Exception as e:  # PIL raises many types for bad files
                    bad.append(start + j)
                    first_error = first_error or (start + j, first_line(e))
            bar.update(min(_DECODE_BATCH, n - start))
    if not bad:
        return loaded, 0
    if not skip_bad_images:
        row, error = first_error
        raise UserInputError(
            f"{len(bad)} image(s) of '{loaded.source}' cannot be decoded (first: row {row}, {error}): fix or remove "
            "them, or pass `skip_bad_images` to train without them."
        )
    if len(bad) == n:
        raise UserInputError(f"none of the {n} images of '{loaded.source}' can be decoded.")
    keep = sorted(set(range(n)) - set(bad))
    return replace(loaded, dataset=loaded.dataset.select(keep)), len(bad)


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
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self._pixels is not None:
            pixels, label = _uint8_to_float(self._pixels[index]), self._labels[index].clone()
        else:
            row = self.dataset[index]
            pixels = _uint8_to_float(self._pixels_of(row[self.image_column], index))
            label = torch.tensor(row[self.label_column] if self.label_column is not None else -1, dtype=torch.long)
        return {"pixel_values": pixels.flip(-1) if self.flip else pixels, "labels": label}

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        """A batch of rows with one read of the underlying table (torch's DataLoader calls this when present)."""
        if self._pixels is not None:
            return [self[i] for i in indices]
        indices = [int(i) + (len(self) if int(i) < 0 else 0) for i in indices]
        if any(not 0 <= i < len(self) for i in indices):
            raise IndexError(f"index out of range for {len(self)} items")
        batch = self.dataset[indices] if indices else {self.image_column: []}
        labels = batch[self.label_column] if self.label_column is not None else [-1] * len(indices)
        items = []
        for index, image, label in zip(indices, batch[self.image_column], labels, strict=True):
            pixels = _uint8_to_float(self._pixels_of(image, index))
            items.append(
                {
                    "pixel_values": pixels.flip(-1) if self.flip else pixels,
                    "labels": torch.tensor(label, dtype=torch.long),
                }
            )
        return items

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
