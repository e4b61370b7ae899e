"""Loading an image data set for training: its image and label columns, its declared label set, unreadable images.

Where the data comes from is ``sources.py``; decoding images into tensors is ``images.py``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np

from ..errors import UserInputError, first_line
from .images import _DECODE_BATCH, _MIN_PROGRESS, open_image
from .sources import DatasetPreset, read_source


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
    num_generated_images: int = 10000,
    seed: int = 0,
    num_proc: int | None = None,
) -> LoadedDataset:
    """Loads an image data set by preset name, local path or Hub id; never touches the network for local data.

    - ``None`` or ``"digits"``: scikit-learn's embedded handwritten digits (the default private data).
    - ``"printed_digits"``, ``"drawn_digits"`` or ``"procedural"``: ``num_generated_images`` generated public images
      (rendered digits; digits drawn as pen strokes; shapes, strokes, textures and glyphs without digits), generated
      with ``seed`` (in ``num_proc`` processes: the same images).
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
    dataset, source, preset = read_source(
        name_or_path,
        split=split,
        cache_dir=cache_dir,
        num_generated_images=num_generated_images,
        seed=seed,
        num_proc=num_proc,
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
                    open_image(value)
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
