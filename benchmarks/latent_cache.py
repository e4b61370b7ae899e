#!/usr/bin/env python
"""Encoding private images into the latent cache, and reading them back as training does: time and memory per N.

    python benchmarks/latent_cache.py                             # N = 10,000 and 60,000 (MNIST train if present)
    python benchmarks/latent_cache.py --sizes 2000 --json out.json

Each N runs in its own process, through what ``train_dp_ldm.py`` runs (``LatentCache.encode_shard`` over
``as_torch_dataset(in_memory=False)`` and the shipped model's ``encode``, then ``LatentCache.load``), and then
reads one epoch of Poisson-sized random batches (rate 2,048 / N) the way the DP loader does (``__getitems__``).
Memory is read from ``/proc/self/status``, sampled every 20 ms by a thread: peak anonymous RSS (``RssAnon``: the
process's own heap, what must not grow with N) and peak file-backed RSS (``RssFile``: pages of the memory-mapped
cache and of loaded libraries, which the kernel can drop and re-read), each as the increase over the process's
level once the model is loaded. Data: the first N rows of MNIST's train split from ``../shared`` when present, else
the embedded digits repeated to N rows (then the timings are the same; the images are not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "datasets" / "mnist" / "train.parquet"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class PeakSampler(threading.Thread):
    """Peak RssAnon and RssFile since the last :meth:`reset`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self.stopped = threading.Event()

    def reset(self) -> dict:
        self.peaks = {k: status_kib(k) for k in self.peaks}
        return dict(self.peaks)

    def run(self):
        while not self.stopped.wait(0.02):
            for k in self.peaks:
                self.peaks[k] = max(self.peaks[k], status_kib(k))


def one_size(n: int, mode: str) -> dict:
    """Runs in the child process: encode N images (``mode`` "cache": into a fresh cache, as training does; "memory":
    into one in-memory ``TensorDataset``, as training did before the cache), then read one epoch."""
    sys.path.insert(0, str(REPO))
    import datasets
    import torch

    from dp_diffusers import DEFAULT_PUBLIC_MODEL
    from dp_diffusers.data import LoadedDataset, as_torch_dataset, load_sklearn_digits
    from dp_diffusers.data.latent_cache import LatentCache
    from dp_diffusers.families import load_family

    datasets.disable_progress_bars()
    if MNIST.is_file():
        data = datasets.load_dataset("parquet", data_files=str(MNIST), split="train")
        source = "MNIST train (first N rows)"
    else:
        data = load_sklearn_digits()
        source = "the embedded digits, repeated"
    data = data.select([i % len(data) for i in range(n)])
    loaded = LoadedDataset(dataset=data, image_column="image", label_column="label", id2label={}, source=source)
    family = load_family(str(DEFAULT_PUBLIC_MODEL))
    sampler = PeakSampler()
    sampler.start()
    base = sampler.reset()
    images = as_torch_dataset(loaded, resolution=family.resolution, channels=family.channels, in_memory=False)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if mode == "cache":
            cache = LatentCache(tmp, "bench")
            cache.encode_shard(
                lambda rows, _: family.encode(images, rows=rows, progress=False), num_rows=n, progress=False
            )
            cache.finish(num_rows=n, world_size=1, flip=False)
            size_mib = sum(p.stat().st_size for p in cache.path.glob("*.arrow")) / 2**20
            data = cache.load()
        else:
            images = as_torch_dataset(loaded, resolution=family.resolution, channels=family.channels)
            data = family.encode(images, progress=False)
            size_mib = sum(t.numel() * t.element_size() for t in data.tensors) / 2**20
        encode_s = time.perf_counter() - started
        encode_peak = dict(sampler.peaks)
        generator = torch.Generator().manual_seed(0)
        rate = min(1.0, 2048 / n)
        started = time.perf_counter()
        batches = int(1 / rate)
        for _ in range(batches):
            rows = torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, rows), batch_size=len(rows))
            next(iter(loader))
        read_s = time.perf_counter() - started
        read_peak = dict(sampler.peaks)
    sampler.stopped.set()

    def mib(peaks):
        return {k: round((peaks[k] - base[k]) / 1024, 1) for k in peaks}

    return {
        "n": n,
        "mode": mode,
        "data": source,
        "latent_shape": list(data.tensors[0].shape[1:]) if n <= 10_000 else None,
        "encode_seconds": round(encode_s, 1),
        "images_per_second": round(n / encode_s, 1),
        "latents_mib": round(size_mib, 1),
        "epoch_read_seconds": round(read_s, 2),
        "epoch_batches": batches,
        "peak_increase_mib_encoding": mib(encode_peak),
        "peak_increase_mib_encoding_and_reading": mib(read_peak),
        "baseline_mib": {k: round(v / 1024, 1) for k, v in base.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000], help="Numbers of private images.")
    p.add_argument("--json", default=None, help="Also write the results here.")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["cache", "memory"],
        choices=["cache", "memory"],
        help="cache: what training runs; memory: one in-memory TensorDataset (training before the cache).",
    )
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(one_size(int(args.child[0]), args.child[1])))
        return
    results = []
    for mode in args.modes:
        for n in args.sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(n), mode], capture_output=True, text=True, check=False
            )
            if proc.returncode:
                sys.exit(f"N={n} ({mode}) failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            peak = r["peak_increase_mib_encoding_and_reading"]
            print(
                f"{mode:6s} N={n:>7,}: encode {r['encode_seconds']:7.1f} s ({r['images_per_second']:.0f} img/s), "
                f"latents {r['latents_mib']:.1f} MiB, one epoch read {r['epoch_read_seconds']:.2f} s; peak increase "
                f"anon {peak['RssAnon']:.1f} MiB, file-backed {peak['RssFile']:.1f} MiB",
                flush=True,
            )
        runs = [r for r in results if r["mode"] == mode]
        if len(runs) > 1:
            a, b = runs[0], runs[-1]
            growth = (
                b["peak_increase_mib_encoding_and_reading"]["RssAnon"]
                / a["peak_increase_mib_encoding_and_reading"]["RssAnon"]
            )
            print(f"{mode}: N x{b['n'] / a['n']:.0f} -> anonymous peak increase x{growth:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
