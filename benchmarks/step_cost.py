#!/usr/bin/env python
"""Cost of one training step of DP-LDM: seconds per example and peak memory, private vs non-private.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --steps 10            # CPU, default model (random init)
    python benchmarks/step_cost.py --device cuda --batch_size 256 --json   # GPU
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --family all --batch_size 32 --steps 10
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --profile dp_attention_blocks_hooks --steps 5

The measurements: step_cost_ours.py (--family ours, every --configs scenario), step_cost_families.py (the other
families' tiny pipelines), step_cost_profile.py (--profile); what they share (the scenarios, the step, the worker
processes, memory, the table): step_cost_utils.py. What is measured and how: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json

import step_cost_families
import step_cost_ours
import step_cost_profile
from step_cost_utils import DEFAULT_SCENARIOS, MODEL_CONFIGS, RENAMED, SCENARIOS, scenario_name, worker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="A pipeline folder (default: LDMConfig() randomly initialised).")
    p.add_argument(
        "--model_config",
        default="default",
        choices=list(MODEL_CONFIGS),
        help="Without --model, the randomly initialised model: default (LDMConfig(), the [32, 64] layout), "
        "tiny (smoke tests), paper_cifar10 (the paper's CIFAR-10 denoiser: 90M parameters, 16 attention blocks).",
    )
    p.add_argument("--tiny", action="store_true", help="Same as --model_config tiny.")
    p.add_argument(
        "--attention_layers",
        default=None,
        help="As train_dp_ldm.py's flag: train only these attention blocks (e.g. 9-16) in the attention-only "
        "scenarios (default: all, as train_dp_ldm.py).",
    )
    p.add_argument(
        "--freeze_embedder",
        action="store_true",
        help="As train_dp_ldm.py's flag: do not train the class embedder in the attention-only scenarios.",
    )
    p.add_argument("--batch_size", type=int, default=64, help="Examples per physical batch.")
    p.add_argument(
        "--physical_batches",
        type=int,
        default=1,
        help="Physical batches per logical step (logical batch = batch_size x this), as with train_dp_ldm.py's "
        "--train_batch_size > --max_physical_batch_size: the per-step work (noise, AdamW) is shared by more examples.",
    )
    p.add_argument("--steps", type=int, default=10, help="Timed logical steps per scenario.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed logical steps first.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N).")
    p.add_argument(
        "--release_cpu_memory",
        action="store_true",
        help="As train_dp_ldm.py's flag: do not make glibc keep freed memory (dp_diffusers.runtime) on CPU.",
    )
    p.add_argument("--seed", type=int, default=0)
    optional = [name for name in SCENARIOS if name not in DEFAULT_SCENARIOS]
    p.add_argument(
        "--configs",
        nargs="+",
        type=scenario_name,
        default=DEFAULT_SCENARIOS,
        choices=list(SCENARIOS),
        help=f"Scenarios to measure ({', '.join(optional)} are optional extras; the old names "
        f"{', '.join(RENAMED)} are still accepted).",
    )
    p.add_argument(
        "--family",
        default="ours",
        choices=[*step_cost_families.FAMILIES, "all"],
        help="ours: the class-conditional LDM (--model / --tiny / LDMConfig()), every --configs. text, dit, "
        "unconditional: that family's tiny random pipeline (dp_diffusers/models/tiny.py), non-private vs DP "
        "attention-only. all: the three plus a tiny RGB 'ours', one table.",
    )
    p.add_argument("--json", action="store_true", help="Print every figure as one JSON object (no table).")
    p.add_argument(
        "--profile", default=None, type=scenario_name, choices=list(SCENARIOS), help="Profile one scenario in-process."
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # a worker process: step_cost_utils.worker
    args = p.parse_args(argv)
    if args.tiny:
        args.model_config = "tiny"
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.physical_batches < 1:
        p.error("--batch_size, --physical_batches and --steps must be >= 1, --warmup >= 0")
    ours_only = args.model or args.model_config != "default" or args.profile or args.attention_layers
    if args.family != "ours" and (ours_only or args.freeze_embedder):
        p.error("--model, --model_config, --attention_layers and --profile apply to --family ours only")
    return args


def main() -> None:
    args = parse_args()
    if args._child:
        worker(args)
    elif args.profile:
        step_cost_profile.profile(args)
    else:
        measurement = step_cost_ours if args.family == "ours" else step_cost_families
        summary = measurement.run(args)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            measurement.print_summary(summary)


if __name__ == "__main__":
    main()
