#!/usr/bin/env python
"""Draw ``make_drawn_digits(N, seed)`` in several processes and write it as one parquet file (public data).

    python benchmarks/mnist/draw_public_digits.py --num_images 60000 --output drawn_digits_60000_seed0.parquet

The ``drawn_digits`` preset draws in one process (~20 images/s on this CPU): 60,000 images take ~50 min, redone on
every start of ``examples/pretrain_public_ldm.py``. This writes the same dataset once (image ``i`` is a pure function
of ``(seed, i)`` and shows digit ``i % 10``, so the split over processes changes nothing; the first images are
checked against the library's own generator), for ``pretrain_public_ldm.py --dataset_name FILE.parquet``.
"""

from __future__ import annotations

import argparse
import functools
from multiprocessing import Pool

import datasets
import numpy as np

from dp_diffusers.data import make_drawn_digits, render_drawn_digit


def _render(i: int, *, seed: int):
    return render_drawn_digit(i % 10, rng=np.random.default_rng([seed, i]), image_size=28)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_proc", type=int, default=2, help="Drawing processes.")
    p.add_argument("--output", required=True, help="The parquet file to write.")
    args = p.parse_args()
    if args.num_images < 1 or args.num_proc < 1:
        p.error("--num_images and --num_proc must be >= 1.")
    with Pool(args.num_proc) as pool:
        images = pool.map(functools.partial(_render, seed=args.seed), range(args.num_images), chunksize=500)
    reference = make_drawn_digits(min(20, args.num_images), seed=args.seed)
    for i, row in enumerate(reference):
        if not np.array_equal(np.asarray(row["image"]), np.asarray(images[i])):
            raise SystemExit(f"image {i} differs from make_drawn_digits: not writing {args.output}")
    labels = [i % 10 for i in range(args.num_images)]
    features = reference.features
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(args.output)
    print(f"wrote {args.output}: {args.num_images} drawn digits, seed {args.seed}")


if __name__ == "__main__":
    main()
