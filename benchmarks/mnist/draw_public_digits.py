#!/usr/bin/env python
"""Draw ``make_drawn_digits(N, seed)`` once, in several processes, and write it as one parquet file (public data).

    python benchmarks/mnist/draw_public_digits.py --num_images 60000 --output drawn_digits_60000_seed0.parquet

The ``drawn_digits`` preset draws 250-550 images/s in one process (60,000 in 1-2 min in two), redone on every start of
``examples/pretrain_public_ldm.py`` (``--preprocessing_num_workers`` splits it over processes). This draws the
same dataset once (image ``i`` is a pure function of ``(seed, i)``), for
``pretrain_public_ldm.py --dataset_name FILE.parquet`` and its resumed starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dp_diffusers.data import make_drawn_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_proc", type=int, default=2, help="Drawing processes.")
    p.add_argument("--output", required=True, help="The parquet file to write.")
    args = p.parse_args()
    if args.num_images < 1 or args.num_proc < 1:
        p.error("--num_images and --num_proc must be >= 1.")
    partial = Path(f"{args.output}.partial")  # renamed when complete: a killed run leaves no finished-looking file
    make_drawn_digits(args.num_images, seed=args.seed, num_proc=args.num_proc).to_parquet(partial)
    partial.replace(args.output)
    print(f"wrote {args.output}: {args.num_images} drawn digits, seed {args.seed}")


if __name__ == "__main__":
    main()
