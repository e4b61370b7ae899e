#!/usr/bin/env python
"""Soak test: many DP steps of the README's main job at a small physical batch, resident memory sampled as it runs.

    python benchmarks/soak.py                      # 2,000 steps, logical batch 64, physical batch 16
    python benchmarks/soak.py --steps 300 --json benchmarks/soak.json

It runs ``train_dp_ldm.py`` in this process (its own code path: engine, hooks, book-keeping, checkpoints every 500
steps), reads this process's resident set size (``VmRSS`` in ``/proc/self/status``) after every 100th logical step,
and prints RSS at step 200 and at the last step, and their ratio (the leak check: within 10%). Each physical batch
re-allocates every layer's per-sample gradients, so a leak of any of them shows up quickly at this batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="Logical DP steps.")
    p.add_argument("--train_batch_size", type=int, default=64, help="Logical (expected) batch.")
    p.add_argument("--max_physical_batch_size", type=int, default=16, help="Physical batch.")
    p.add_argument("--every", type=int, default=100, help="Sample RSS after every N-th step.")
    p.add_argument("--json", default=None, help="Also write the samples and the summary here.")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    import train_dp_ldm
    from dp_diffusers.privacy import DPEngine

    samples: list[tuple[int, float, float]] = []
    started = time.time()
    step = DPEngine.step

    def sampled_step(engine):
        taken = step(engine)
        if taken and engine.steps % args.every == 0:
            samples.append((engine.steps, rss_mib(), time.time() - started))
            print(f"step {engine.steps:5d}  RSS {samples[-1][1]:8.1f} MiB  {samples[-1][2]:7.0f} s", flush=True)
        return taken

    DPEngine.step = sampled_step
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--output_dir", str(Path(tmp) / "soak"), "--max_train_steps", str(args.steps),
            "--train_batch_size", str(args.train_batch_size),
            "--max_physical_batch_size", str(args.max_physical_batch_size),
            "--checkpointing_steps", "500", "--num_validation_images", "10", "--num_inference_steps", "5",
            "--report_to", "none",
        ]  # fmt: skip
        train_dp_ldm.main(train_dp_ldm.parse_args(argv))
    by_step = {s: r for s, r, _ in samples}
    early = by_step.get(200, samples[0][1])
    last_step, last = samples[-1][0], samples[-1][1]
    summary = {
        "steps": last_step,
        "train_batch_size": args.train_batch_size,
        "max_physical_batch_size": args.max_physical_batch_size,
        "rss_mib_step_200": round(early, 1),
        "rss_mib_last": round(last, 1),
        "ratio_last_to_200": round(last / early, 4),
        "seconds": round(time.time() - started, 1),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
