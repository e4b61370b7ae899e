"""The private latent cache: sharded encoding, reuse, memory-mapped reads, random flip; and the image crops."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from dp_diffusers.data import LoadedDataset, as_torch_dataset
from dp_diffusers.data.latent_cache import LatentCache, cache_key, module_fingerprint, shard_rows

N = 23
IMAGES = torch.randn(N, 3, 4, 4)
LABELS = torch.arange(N) % 5


class Recorder:
    """An ``encode(rows, flipped)`` that records which rows it was asked for (a family's encode stands behind it in
    the script)."""

    def __init__(self):
        self.calls: list[tuple[list[int], bool]] = []

    def __call__(self, rows, flipped):
        rows = list(rows)
        self.calls.append((rows, flipped))
        x = IMAGES[rows].flip(-1) if flipped else IMAGES[rows]
        return torch.utils.data.TensorDataset(x, x.std((1, 2, 3)), LABELS[rows])

    def rows(self, flipped=False) -> list[int]:
        return [r for rows, f in self.calls if f == flipped for r in rows]


def build(tmp_path, *, world_size=1, flip=False, key="k"):
    cache = LatentCache(tmp_path, key)
    recorders = []
    for rank in range(world_size):
        recorders.append(Recorder())
        cache.encode_shard(
            recorders[-1], num_rows=N, rank=rank, world_size=world_size, flip=flip, batch_size=4, progress=False
        )
    cache.finish(num_rows=N, world_size=world_size, flip=flip)
    return cache, recorders


def test_ranks_encode_disjoint_contiguous_blocks_that_cover_every_row(tmp_path):
    cache, recorders = build(tmp_path, world_size=3)
    # Each rank's rows (the first row is encoded twice: once to learn the tensors' shapes).
    seen = [sorted(set(r.rows())) for r in recorders]
    assert seen == [list(shard_rows(N, rank=k, world_size=3)) for k in range(3)]
    assert sorted(row for rows in seen for row in rows) == list(range(N))
    assert all(not set(a) & set(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert sorted(p.name for p in cache.path.glob("*.arrow")) == [f"shard-{k:05d}-of-00003.arrow" for k in range(3)]


def test_the_cache_reads_back_every_row_in_order_whatever_the_number_of_processes(tmp_path):
    one, _ = build(tmp_path / "one", world_size=1)
    three, _ = build(tmp_path / "three", world_size=3)
    for cache in (one, three):
        data = cache.load()
        assert len(data) == N
        x, s, y = data.tensors
        assert torch.equal(x, IMAGES) and torch.equal(y, LABELS)
        assert torch.allclose(s, IMAGES.std((1, 2, 3)))
        row = data[7]
        assert isinstance(row, tuple) and torch.equal(row[0], IMAGES[7]) and int(row[2]) == LABELS[7]


def test_a_complete_cache_is_reused_and_an_interrupted_one_keeps_its_finished_shards(tmp_path):
    cache, _ = build(tmp_path, world_size=2)
    assert cache.complete
    again = LatentCache(tmp_path, "k")
    assert again.complete  # what the script checks before encoding anything

    # An interrupted two-process encode: rank 0 finished its shard, rank 1 did not, nobody wrote the manifest.
    partial = LatentCache(tmp_path, "other")
    partial.encode_shard(Recorder(), num_rows=N, rank=0, world_size=2, progress=False)
    assert not partial.complete
    with pytest.raises(RuntimeError, match="not written"):
        partial.finish(num_rows=N, world_size=2, flip=False)
    rerun = Recorder()
    partial.encode_shard(rerun, num_rows=N, rank=0, world_size=2, progress=False)
    assert rerun.calls == []  # rank 0's finished shard is not encoded again
    partial.encode_shard(rerun, num_rows=N, rank=1, world_size=2, progress=False)
    partial.finish(num_rows=N, world_size=2, flip=False)
    assert torch.equal(partial.load().tensors[0], IMAGES)


def test_the_dataloader_reads_batches_through_getitems(tmp_path):
    cache, _ = build(tmp_path)
    data = cache.load()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, [3, 1, 4, 1, 5]), batch_size=5)
    x, _, y = next(iter(loader))
    assert torch.equal(x, IMAGES[[3, 1, 4, 1, 5]]) and torch.equal(y, LABELS[[3, 1, 4, 1, 5]])


def test_random_flip_stores_both_ways_and_draws_each_row_either_way(tmp_path):
    cache, (recorder,) = build(tmp_path, flip=True)
    assert sorted(set(recorder.rows(flipped=True))) == list(range(N))
    data = cache.load()
    plain, mirrored = 0, 0
    for _ in range(20):
        for i, (x, _, y) in enumerate(data.__getitems__(list(range(N)))):
            assert int(y) == LABELS[i]
            if torch.equal(x, IMAGES[i]):
                plain += 1
            else:
                assert torch.equal(x, IMAGES[i].flip(-1))
                mirrored += 1
    assert plain + mirrored == 20 * N and 0.35 < plain / (20 * N) < 0.65
    assert torch.equal(data.tensors[0], IMAGES)  # .tensors: the unflipped rows


def test_the_key_changes_with_every_input_the_latents_depend_on():
    base = dict(data="abc", encoder={"vae": "1"}, resolution=28, channels=1, crop="center", random_flip=False)
    keys = {cache_key(**base)}
    for change in (
        {"data": "abd"},
        {"encoder": {"vae": "2"}},
        {"resolution": 32},
        {"channels": 3},
        {"crop": "random from seed 1"},
        {"random_flip": True},
    ):
        keys.add(cache_key(**{**base, **change}))
    assert len(keys) == 7
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))


def test_module_fingerprint_sees_one_changed_weight():
    layer = torch.nn.Conv2d(2, 3, 3)
    before = module_fingerprint(layer)
    assert module_fingerprint(layer) == before
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] += 1e-6
    assert module_fingerprint(layer) != before


# ---------------------------------------------------------------------------------------------------- crops


def _wide(width=40, height=20) -> LoadedDataset:
    """Images whose column index is their pixel value (so a crop's left edge reads off its first pixel)."""
    row = np.arange(width, dtype=np.uint8) * 5
    image = Image.fromarray(np.tile(row, (height, 1)), mode="L")
    ds = datasets.Dataset.from_dict({"image": [image] * 12}, features=datasets.Features({"image": datasets.Image()}))
    return LoadedDataset(dataset=ds, image_column="image", label_column=None, id2label={}, source="wide")


@pytest.mark.parametrize("in_memory", [True, False])
def test_center_crop_takes_the_middle_square(in_memory):
    data = as_torch_dataset(_wide(), resolution=20, channels=1, in_memory=in_memory, center_crop=True)
    lefts = {int(round((float(data[i]["pixel_values"][0, 0, 0]) + 1) * 127.5)) // 5 for i in range(12)}
    assert lefts == {10}


@pytest.mark.parametrize("in_memory", [True, False])
def test_without_center_crop_each_image_keeps_one_random_square(in_memory):
    data = as_torch_dataset(_wide(), resolution=20, channels=1, in_memory=in_memory, center_crop=False, crop_seed=3)

    def left(d, i):
        return int(round((float(d[i]["pixel_values"][0, 0, 0]) + 1) * 127.5)) // 5

    lefts = [left(data, i) for i in range(12)]
    assert all(0 <= x <= 20 for x in lefts) and len(set(lefts)) > 3  # squares inside the image, at many places
    assert lefts == [left(data, i) for i in range(12)]  # the same crop every time a row is read
    other = as_torch_dataset(_wide(), resolution=20, channels=1, in_memory=in_memory, center_crop=False, crop_seed=4)
    assert lefts != [left(other, i) for i in range(12)]


def test_flipped_mirrors_the_pixels_only():
    data = as_torch_dataset(_wide(), resolution=20, channels=1, in_memory=False)
    mirror = data.flipped()
    assert torch.equal(mirror[2]["pixel_values"], data[2]["pixel_values"].flip(-1))
    assert torch.equal(mirror[2]["labels"], data[2]["labels"]) and not data.flip
