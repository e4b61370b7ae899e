"""Labelled image sets as ``.npz`` files, resumable class-balanced sampling from a pipeline, and sample grids.

The ``.npz`` format holds ``x``: ``uint8`` images ``[N, H, W, C]`` (C = 1 or 3) and ``y``: ``int64`` labels ``[N]``.
It is what :func:`generate_samples` writes and what ``examples/evaluate.py`` reads; any set of labelled images in
this format can be evaluated, real images included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..errors import UserInputError

logger = logging.getLogger(__name__)

_FORMAT = "x: uint8 images [N, H, W, C] (or [N, H, W]) and y: integer labels [N]"
_META_KEY = "generation_meta"


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` via a temporary sibling file and ``os.replace`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_image(image: Image.Image, path: str | os.PathLike) -> str:
    """Saves a PIL image atomically (format from the suffix of ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return str(path)


def validate_images(x: np.ndarray, y: np.ndarray, *, source: str = "images") -> tuple[np.ndarray, np.ndarray]:
    """Checks a labelled image set and returns it as ``(uint8 [N, H, W, C], int64 [N])``.

    ``[N, H, W]`` grayscale gains ``C = 1``. Raises :class:`UserInputError` for a wrong dtype or shape, mismatched
    lengths, an empty set or negative labels.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8:
        raise UserInputError(f"{source}: x has dtype {x.dtype}, expected uint8 in [0, 255] ({_FORMAT}).")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        hint = " (channels first? transpose to [N, H, W, C])" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
        raise UserInputError(f"{source}: x has shape {tuple(x.shape)}, expected {_FORMAT}{hint}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserInputError(f"{source}: y has dtype {y.dtype}, expected integer class labels ({_FORMAT}).")
    if y.ndim != 1 or len(y) != len(x):
        raise UserInputError(f"{source}: y has shape {tuple(y.shape)} but x holds {len(x)} images ({_FORMAT}).")
    if len(x) == 0:
        raise UserInputError(f"{source}: the set is empty.")
    if y.min() < 0:
        raise UserInputError(f"{source}: labels must be >= 0, found {int(y.min())}.")
    return np.ascontiguousarray(x), y.astype(np.int64)


def save_npz(path: str | os.PathLike, *, x: np.ndarray, y: np.ndarray, meta: dict | None = None) -> str:
    """Validates and atomically writes a labelled image set (``x``, ``y``; optional JSON ``meta``) to ``path``."""
    x, y = validate_images(x, y, source=str(path))
    arrays = {"x": x, "y": y}
    if meta is not None:
        arrays[_META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    _atomic_save_npz(Path(path), arrays)
    return str(path)


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads a labelled image set written by :func:`save_npz` (or any ``.npz`` with ``x`` and ``y``).

    Returns ``(x uint8 [N, H, W, C], y int64 [N])``; raises :class:`UserInputError` for a missing or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"No such samples file: {str(path)!r} (expected an .npz with {_FORMAT}).")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise UserInputError(
                    f"{path}: no array {' or '.join(map(repr, missing))} (found {data.files}); expected {_FORMAT}."
                )
            x, y = data["x"], data["y"]
    except UserInputError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserInputError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}).") from e
    return validate_images(x, y, source=str(path))


def _read_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            if _META_KEY not in data.files:
                return None
            return json.loads(str(data[_META_KEY]))
    except Exception:  # an unreadable old file just gets regenerated
        return None


def class_grid(x: np.ndarray, y: np.ndarray, *, per_class: int = 10, classes: Sequence[int] | None = None):
    """One row per class with the first ``per_class`` images of that class (blank tiles where a class has fewer)."""
    x, y = validate_images(x, y)
    classes = sorted(int(c) for c in np.unique(y)) if classes is None else [int(c) for c in classes]
    blank = np.zeros_like(x[0])
    tiles = []
    for c in classes:
        idx = np.flatnonzero(y == c)[:per_class]
        tiles.extend(x[idx])
        tiles.extend([blank] * (per_class - len(idx)))
    # diffusers' grid, as for pipeline samples (grids.pipeline_class_grid)
    images = [Image.fromarray(t[..., 0] if t.ndim == 3 and t.shape[-1] == 1 else t) for t in tiles]
    return make_image_grid(images, rows=len(classes), cols=per_class)


def grid_path_for(output_path: str | os.PathLike) -> str:
    """Where :func:`generate_samples` puts the sample grid: ``samples.npz`` -> ``samples_grid.png``."""
    p = Path(output_path)
    return str(p.with_name(f"{p.stem}_grid.png"))


def balanced_labels(num_samples: int, classes: Sequence[int]) -> np.ndarray:
    """Labels that cycle through ``classes`` (0, 1, ..., K-1, 0, 1, ...): every prefix and every chunk is balanced.

    For ``num_samples`` a multiple of ``len(classes)`` each class gets exactly ``num_samples / K`` samples
    (6,000 each for 60,000 MNIST samples); otherwise the first classes get one more.
    """
    return np.resize(np.asarray(list(classes), dtype=np.int64), int(num_samples))


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``'s generator, derived from ``(seed, chunk)`` only (independent of resumption)."""
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def pipeline_fingerprint(pipe) -> str | None:
    """sha256 (16 hex digits) of the weights of every ``torch.nn.Module`` in ``pipe.components``, or ``None``.

    Recorded with the chunks so that a resumed run never mixes samples of two different models.
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return None
    digest = hashlib.sha256()
    for name in sorted(components):
        module = components[name]
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _to_uint8(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[..., None]
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def generate_samples(
    pipe,
    *,
    num_samples: int,
    output_path: str,
    batch_size: int = 500,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    classes: list[int] | None = None,
    progress: bool = True,
) -> str:
    """Draws ``num_samples`` class-balanced samples from ``pipe`` and writes them to the ``.npz`` ``output_path``.

    Resumable: each chunk of ``batch_size`` samples is saved to ``output_path + ".parts/part_XXXXX.npz"`` as soon as
    it is done (atomically), and a rerun with the same arguments skips finished chunks. Chunk ``i`` is sampled with
    a generator seeded from ``(seed, i)``, so an interrupted and resumed run writes exactly the samples of an
    uninterrupted one; the chunks record the settings and a fingerprint of the model's weights, and a rerun with
    other ones is refused rather than mixed in (:class:`UserInputError`). When all chunks exist they are merged into
    ``output_path`` (``x`` uint8 ``[N, H, W, C]``, ``y`` int64 labels), a grid PNG with one row per class is written
    beside it (see :func:`grid_path_for`) and the parts folder is removed. If ``output_path`` already holds samples
    made with the same arguments and model, it is kept.

    Args:
        pipe: a :class:`~dp_diffusers.DPLDMPipeline` or any callable with its signature
            (``class_labels``, ``num_inference_steps``, ``guidance_scale``, ``eta``, ``generator``,
            ``output_type="np"``, returning ``.images`` floats ``[B, H, W, C]`` in [0, 1]). Its own progress bar is
            switched off.
        num_samples: total number of samples; labels cycle through ``classes`` (balanced, see
            :func:`balanced_labels`).
        output_path: the ``.npz`` to write.
        batch_size: samples per pipeline call and per saved chunk.
        num_inference_steps, guidance_scale, eta: passed to ``pipe``.
        seed: base seed; chunk generators are seeded from ``(seed, chunk index)`` (CPU generators).
        classes: class ids to sample; defaults to all of ``pipe.id2label``.
        progress: show a tqdm progress bar (in samples).

    Returns:
        ``output_path``.
    """
    if int(num_samples) < 1:
        raise UserInputError(f"num_samples must be >= 1, got {num_samples}.")
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}.")
    if classes is None:
        id2label = getattr(pipe, "id2label", None)
        if not id2label:
            raise UserInputError("The pipeline has no id2label: pass classes=[...] to generate_samples.")
        classes = sorted(int(k) for k in id2label)
    classes = [int(c) for c in classes]
    if not classes:
        raise UserInputError("classes must not be empty.")
    num_samples, batch_size = int(num_samples), int(batch_size)
    output = Path(output_path)
    meta = {
        "num_samples": num_samples,
        "batch_size": batch_size,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "eta": float(eta),
        "seed": int(seed),
        "classes": classes,
        "model": pipeline_fingerprint(pipe),
    }
    parts = Path(f"{output}.parts")
    if output.is_file() and _read_meta(output) == meta:
        logger.info("%s already holds these samples; skipping generation.", output)
        shutil.rmtree(parts, ignore_errors=True)  # left over if a run stopped right after the final write
        return str(output)

    parts.mkdir(parents=True, exist_ok=True)
    meta_file = parts / "meta.json"
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old != meta:
            raise UserInputError(
                f"{parts} holds chunks sampled with other settings ({old}); delete it or choose another output path."
            )
    else:
        atomic_write_text(meta_file, json.dumps(meta, sort_keys=True))

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    labels = balanced_labels(num_samples, classes)
    num_chunks = math.ceil(num_samples / batch_size)
    part_paths = [parts / f"part_{i:05d}.npz" for i in range(num_chunks)]
    done = sum(min(batch_size, num_samples - i * batch_size) for i, p in enumerate(part_paths) if p.is_file())
    with tqdm(total=num_samples, initial=done, desc="sampling", unit="img", disable=not progress) as bar:
        for i, part in enumerate(part_paths):
            if part.is_file():
                continue
            chunk_labels = labels[i * batch_size : (i + 1) * batch_size]
            generator = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, i))
            out = pipe(
                class_labels=chunk_labels.tolist(),
                num_inference_steps=int(num_inference_steps),
                guidance_scale=float(guidance_scale),
                eta=float(eta),
                generator=generator,
                output_type="np",
            )
            images = _to_uint8(out.images if hasattr(out, "images") else out[0])
            if len(images) != len(chunk_labels):
                raise RuntimeError(f"The pipeline returned {len(images)} images for {len(chunk_labels)} labels.")
            save_npz(part, x=images, y=chunk_labels)
            bar.update(len(chunk_labels))

    xs, ys = zip(*(load_npz(p) for p in part_paths), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    save_npz(output, x=x, y=y, meta=meta)
    save_image(class_grid(x, y, per_class=10, classes=classes), grid_path_for(output))
    shutil.rmtree(parts, ignore_errors=True)
    return str(output)
