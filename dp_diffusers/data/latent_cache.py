"""Private latents encoded once into a memory-mapped Arrow cache (``datasets``), split over ranks, reused later.

The frozen autoencoder turns each private image into a few per-example tensors (latent mean and std, label, ...).
Held in memory they cost ``N`` times their size on every process, and every process would encode all ``N`` images.
Here each rank encodes its own contiguous block of rows with ``datasets.Dataset.map`` into an Arrow file (written
in batches, moved into place only when complete, read back memory-mapped), and the blocks are concatenated without
copying. Training reads rows from the page cache, so resident memory does not grow with ``N``.

What datasets does not do, and why it is written here: its own ``map`` cache lives in HF's shared cache folder and
is keyed by the pickled function; ours is keyed by what the latents depend on (the data set's fingerprint, the
autoencoder's weights, resolution, crop and flip), split over ranks, and kept where the user chose: the latents of
private images are private data, so they stay beside the run (never uploaded) and the model card says where.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

#: Bumped when the cache's layout or the encoding changes; part of every key.
CACHE_FORMAT = 1
_MANIFEST = "manifest.json"


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 digits) of a module's class, config and every tensor of its state dict."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def cache_key(**parts) -> str:
    """A short hash of ``parts`` (JSON-serialisable): the name of one cache under the cache folder."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _features(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> datasets.Features:
    """One fixed-size list column per per-example tensor (``[R, ...]``, flattened per row; the shapes go to the
    manifest): its values are one contiguous buffer per record batch, which :class:`EncodedDataset` reads without
    copying."""
    features = {}
    for name, tensor in zip(names, tensors, strict=True):
        dtype = str(tensor.numpy().dtype)
        numel = int(np.prod(tensor.shape[1:], dtype=np.int64))
        features[name] = (
            datasets.Value(dtype) if tensor.dim() == 1 else datasets.Sequence(datasets.Value(dtype), length=numel)
        )
    return datasets.Features(features)


def shard_rows(n: int, *, rank: int, world_size: int) -> range:
    """The contiguous block of ``n`` rows that rank ``rank`` of ``world_size`` encodes (blocks differ by <= 1)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


class LatentCache:
    """One cache: the folder ``directory / key`` holding ``shard-<r>-of-<w>.arrow`` files and, once every shard is
    written, ``manifest.json`` (which marks it complete). A complete cache is reused whatever the process count."""

    def __init__(self, directory: str | os.PathLike, key: str):
        self.path = Path(directory) / key

    @property
    def complete(self) -> bool:
        return (self.path / _MANIFEST).is_file()

    def shard_file(self, rank: int, world_size: int) -> Path:
        return self.path / f"shard-{rank:05d}-of-{world_size:05d}.arrow"

    def encode_shard(
        self,
        encode: Callable[[Sequence[int], bool], torch.utils.data.TensorDataset],
        *,
        num_rows: int,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = False,
        batch_size: int = 256,
        progress: bool = True,
    ) -> range:
        """Encode this rank's block of rows (``encode(rows, flipped)`` gives their tensors), unless its shard file is
        already there (an interrupted run's finished shards are kept). ``flip`` also stores every row's tensors for
        the image mirrored left-right. Returns the rows of this rank."""
        rows = shard_rows(num_rows, rank=rank, world_size=world_size)
        target = self.shard_file(rank, world_size)
        if target.is_file() or not len(rows):
            return rows
        self.path.mkdir(parents=True, exist_ok=True)
        first = list(encode([rows[0]], False).tensors) * (2 if flip else 1)  # the columns' dtypes and shapes
        names = [f"t{i}" for i in range(len(first) // (2 if flip else 1))]
        names += [f"flipped_{name}" for name in names] if flip else []
        features = _features(first, names)
        # Columns are stored flat (zero-copy reads); their per-example shapes go to the manifest (finish()).
        (self.path / f".shapes-{rank:05d}.json").write_text(
            json.dumps({name: list(t.shape[1:]) for name, t in zip(names, first, strict=True)})
        )

        def encode_batch(batch: dict) -> dict:
            index = batch["row"]
            tensors = list(encode(index, False).tensors)
            if flip:
                tensors += list(encode(index, True).tensors)
            return {
                name: t.reshape(len(t), -1).numpy() if t.dim() > 1 else t.numpy()
                for name, t in zip(names, tensors, strict=True)
            }

        # A small in-memory table of row numbers, mapped to the latents; datasets writes the result batch by batch to
        # a temporary file and moves it to ``target`` when done, so an interrupted encode leaves no partial shard.
        with contextlib.nullcontext() if progress else _progress_bars_disabled():
            datasets.Dataset.from_dict({"row": list(rows)}).map(
                encode_batch,
                batched=True,
                batch_size=batch_size,
                remove_columns=["row"],
                features=features,
                cache_file_name=str(target),
                load_from_cache_file=False,
                # Our key names the result: datasets would otherwise hash the pickled function, encoder and all.
                new_fingerprint=f"{self.path.name}-{rank}-of-{world_size}",
                desc=f"Encoding private latents (rows {rows.start}..{rows.stop - 1})",
            )
        return rows

    def finish(self, *, num_rows: int, world_size: int, flip: bool) -> None:
        """Mark the cache complete once every rank's shard is written (the main process, after a barrier)."""
        ranks = [r for r in range(world_size) if len(shard_rows(num_rows, rank=r, world_size=world_size))]
        shards = [self.shard_file(r, world_size) for r in ranks]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise RuntimeError(f"latent cache {self.path}: shards {missing} were not written")
        shapes = json.loads((self.path / f".shapes-{ranks[0]:05d}.json").read_text())
        manifest = {"shards": [s.name for s in shards], "rows": num_rows, "flip": flip, "shapes": shapes}
        tmp = self.path / f".{_MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, self.path / _MANIFEST)

    def load(self) -> EncodedDataset:
        """The complete cache as a map-style ``torch`` dataset, memory-mapped."""
        manifest = json.loads((self.path / _MANIFEST).read_text())
        parts = [datasets.Dataset.from_file(str(self.path / name)) for name in manifest["shards"]]
        table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(table) != manifest["rows"]:
            raise RuntimeError(f"latent cache {self.path}: {len(table)} rows, its manifest says {manifest['rows']}")
        return EncodedDataset(table, shapes=manifest["shapes"], flip=manifest["flip"])


class _progress_bars_disabled:
    """datasets' progress bars off for a block (restored after)."""

    def __enter__(self):
        self.was = datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        if not self.was:
            datasets.enable_progress_bars()


class EncodedDataset(torch.utils.data.Dataset):
    """Rows of a latent cache as tuples of tensors (what the family's loss takes), read from memory-mapped Arrow.

    Reads go straight to the Arrow buffers: each column of each record batch is a zero-copy numpy view of the mapped
    file, and a batch of rows is one numpy gather per column. (datasets' own ``Dataset.__getitem__`` with a list of
    indices and the torch format took 0.7 s for 2,048 rows of three small tensors, measured; this takes ~1 ms.)

    With ``flip`` each read returns, per row, the tensors of the image or of its mirror with probability 1/2 each
    (torch's global generator: a per-example augmentation, like the loss's own noise draws)."""

    def __init__(self, table: datasets.Dataset, *, shapes: dict[str, list[int]], flip: bool = False):
        self.table, self.flip = table, flip
        self.names = [c for c in table.column_names if not c.startswith("flipped_")]
        arrow = table.data.table  # the pyarrow Table behind datasets' memory-mapped table
        self._views: dict[str, list[np.ndarray]] = {}
        lengths = None
        for name in table.column_names:
            chunks = arrow.column(name).chunks
            self._views[name] = [_numpy_view(chunk, shapes[name]) for chunk in chunks]
            lengths = [len(chunk) for chunk in chunks]
        self._starts = np.cumsum([0, *lengths])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index) -> tuple[torch.Tensor, ...]:
        return self.__getitems__([int(index)])[0]

    def _gather(self, name: str, indices: np.ndarray) -> torch.Tensor:
        chunk = np.searchsorted(self._starts, indices, side="right") - 1
        views = self._views[name]
        if len(views) == 1:
            return torch.from_numpy(views[0][indices])
        out = np.empty((len(indices), *views[0].shape[1:]), dtype=views[0].dtype)
        for c in np.unique(chunk):
            mask = chunk == c
            out[mask] = views[c][indices[mask] - self._starts[c]]
        return torch.from_numpy(out)

    def columns(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The stacked tensors of ``indices``, one per column (a random choice of mirrored rows with ``flip``)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        indices = np.where(indices < 0, indices + len(self), indices)
        columns = [self._gather(name, indices) for name in self.names]
        if self.flip:
            mirrored = torch.rand(len(indices)) < 0.5
            columns = [
                torch.where(mirrored.view(-1, *([1] * (col.dim() - 1))), self._gather(f"flipped_{name}", indices), col)
                for name, col in zip(self.names, columns, strict=True)
            ]
        return columns

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
        """A whole batch in one gather per column (torch's DataLoader calls this when a dataset has it)."""
        columns = self.columns(indices)
        return [tuple(col[i] for col in columns) for i in range(len(indices))]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every row's tensors, stacked (unflipped), as ``TensorDataset.tensors``: for small sets and tests."""
        indices = np.arange(len(self))
        return tuple(self._gather(name, indices) for name in self.names)


def _numpy_view(chunk, shape: Sequence[int]) -> np.ndarray:
    """``[rows, *shape]`` numpy view of one Arrow chunk of a fixed-size list (or scalar) column, without a copy."""
    if isinstance(chunk.type, pa.FixedSizeListType):
        values = chunk.flatten().to_numpy(zero_copy_only=True)
        return values.reshape(len(chunk), *shape)
    return chunk.to_numpy(zero_copy_only=True)
