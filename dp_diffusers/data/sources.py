"""Finding and reading an image data set: presets, local folders and parquet files, Hub ids (``datasets``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import UserInputError, first_line
from .drawn_digits import make_drawn_digits
from .printed_digits import make_printed_digits
from .procedural import make_procedural_images
from .sklearn_digits import load_sklearn_digits


@dataclass(frozen=True)
class DatasetPreset:
    """A named data set: where it lives and how to read it.

    ``hub_id`` is ``None`` for the embedded and generated sets (``digits``, ``printed_digits``, ``drawn_digits``,
    ``procedural``).
    ``label_column`` is ``None`` for unconditional data. ``class_names`` names the label ids of a column that is not a
    ``ClassLabel`` (e.g. a boolean attribute); ``None`` keeps the column's own names.
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
            name="drawn_digits",
            hub_id=None,
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="digits drawn by code as jittered pen strokes (and some printed ones), elastically distorted, "
            "MNIST-style (generated, public; closer to handwriting than printed_digits)",
        ),
        DatasetPreset(
            name="procedural",
            hub_id=None,
            image_column="image",
            label_column="label",
            resolution=28,
            channels=1,
            description="shapes, pen strokes, textures, silhouettes and glyphs of many scripts, drawn by code, no "
            "digits (generated, public; the domain-general prior's data)",
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


_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
_SPLIT_RE = re.compile(rf"^({'|'.join(_SPLIT_NAMES)})(?:[-_.].*)?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: The embedded and generated presets (no Hub id).
_GENERATED = ("digits", "printed_digits", "drawn_digits", "procedural")


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


def _read_embedded(name: str, split: str, *, num_generated_images: int, seed: int, num_proc: int | None = None):
    preset = PRESETS[name]
    if split != "train":
        raise UserInputError(
            f"the embedded data set '{preset.name}' has only a 'train' split, not '{split}'; pass `split`=train."
        )
    if preset.name == "digits":
        return load_sklearn_digits(), "scikit-learn digits (embedded, 1,797 images)", preset
    if preset.name == "procedural":
        dataset = make_procedural_images(num_generated_images, seed=seed, num_proc=num_proc)
        return (
            dataset,
            f"procedural shapes (drawn by code, digit-free, {num_generated_images} images, seed {seed})",
            preset,
        )
    if preset.name == "drawn_digits":
        dataset = make_drawn_digits(num_generated_images, seed=seed, num_proc=num_proc)
        return (
            dataset,
            f"drawn digits (pen strokes drawn by code and printed digits rendered from matplotlib's fonts, "
            f"elastically distorted, {num_generated_images} images, seed {seed})",
            preset,
        )
    dataset = make_printed_digits(num_generated_images, seed=seed, num_proc=num_proc)
    return (
        dataset,
        f"printed digits (rendered from matplotlib's fonts, {num_generated_images} images, seed {seed})",
        preset,
    )


def _read_path(name: str, split: str, cache_dir: str | None):
    """A local folder, one or more .parquet files, or else a Hub id ``owner/name``."""
    path = Path(name).expanduser()
    parts = [Path(p.strip()).expanduser() for p in name.split(",") if p.strip()]
    if path.is_dir():
        return _load_local_dir(path, split)
    if parts and all(p.suffix == ".parquet" for p in parts):
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise UserInputError(f"no such parquet file: {', '.join(missing)}")
        source = ",".join(str(p) for p in parts)
        return _load_parquet([str(p) for p in parts], source=source), source
    if path.exists():
        raise UserInputError(f"'{name}' is neither a folder nor a .parquet file; pass a folder or .parquet file.")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise UserInputError(f"no such file or folder: '{name}'")
    if _HUB_ID_RE.match(name):
        return _load_hub(name, split, cache_dir), f"{name} ({split})"
    raise UserInputError(
        f"unknown dataset '{name}': use a preset ({_presets_list()}), a Hub id 'owner/name', a local folder "
        "or a .parquet file."
    )


def read_source(
    name_or_path: str | None,
    *,
    split: str = "train",
    cache_dir: str | None = None,
    num_generated_images: int = 10000,
    seed: int = 0,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, str, DatasetPreset | None]:
    """``(dataset, source description, preset or None)`` for a preset name, local path or Hub id (see
    ``load_image_dataset``); never touches the network for local data."""
    name = name_or_path.strip() if isinstance(name_or_path, str) else name_or_path
    if not name or name in _GENERATED:
        return _read_embedded(
            name or "digits", split, num_generated_images=num_generated_images, seed=seed, num_proc=num_proc
        )
    if name in PRESETS:
        preset = PRESETS[name]
        return _load_hub(preset.hub_id, split, cache_dir), f"{preset.hub_id} ({split})", preset
    dataset, source = _read_path(name, split, cache_dir)
    return dataset, source, None
