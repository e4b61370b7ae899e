#!/usr/bin/env python
"""Private MNIST from a public digit prior, end to end, resumable stage by stage.

    python benchmarks/mnist/run.py --epsilon 10 --name eps10
    python benchmarks/mnist/run.py --epsilon 1 --name eps1

Stages (each skipped when its output exists, and each resumable inside):
  1. finetune  train_dp_ldm.py on the 60,000 MNIST training images from the public digit model
               (checkpoints every --checkpointing_steps; rerun resumes from the latest)
  2. evaluate  examples/evaluate.py: draws --num_samples samples (resumable chunks), trains the downstream CNN on
               them only (3 seeds, model selection on held-out samples), scores the 10,000 real test images
  3. record    appends the run to benchmarks/mnist/results.json (replacing a run of the same name)

The public model is dp_diffusers.DEFAULT_PUBLIC_MODEL unless --public_model is given. Real MNIST is read from
../shared/datasets/mnist (the Hub's ylecun/mnist layout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MNIST = REPO.parent / "shared" / "datasets" / "mnist"


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (1 GPU)"
    except ImportError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()}"


def run(cmd: list[str], env: dict | None = None) -> float:
    print("+", shlex.join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, **(env or {})})
    return time.time() - started


def save_samples(source: Path, target: Path, count: int) -> None:
    """The first ``count / 10`` samples of each class of ``source`` (evaluate.py's samples.npz), compressed."""
    import numpy as np

    with np.load(source) as data:
        x, y = data["x"], data["y"].astype(np.int64)
    per_class = count // 10
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
    images = x[keep].reshape(len(keep), 28, 28).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, x=images, y=y[keep])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="Run name (folder under benchmarks/mnist/runs/ and results key).")
    p.add_argument("--epsilon", type=float, default=None, help="Required unless --public_only.")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--public_model", default=None, help="Default: dp_diffusers.DEFAULT_PUBLIC_MODEL.")
    p.add_argument("--mnist", default=str(MNIST), help="Folder with train.parquet and test.parquet.")
    p.add_argument("--train_batch_size", type=int, default=2048)
    p.add_argument("--max_physical_batch_size", type=int, default=256)
    p.add_argument("--num_train_epochs", type=float, default=10)
    p.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Default: train_dp_ldm.py's (what the base's pretraining.json recommends, else 1e-3).",
    )
    p.add_argument("--max_grad_norm", type=float, default=1e-3)
    p.add_argument("--noise_multiplicity", type=int, default=1)
    p.add_argument("--attention_layers", default=None)
    p.add_argument("--trainable_scope", default=None, help="train_dp_ldm.py's --trainable_scope (lever 1).")
    p.add_argument("--use_lora", action="store_true", help="LoRA on the attention projections (lever 1).")
    p.add_argument("--lora_rank", type=int, default=None)
    p.add_argument("--lr_scheduler", default="constant", help="train_dp_ldm.py's --lr_scheduler.")
    p.add_argument(
        "--public_only",
        action="store_true",
        help="No fine-tune: evaluate the public model itself (no private data), the floor DP fine-tuning must beat.",
    )
    p.add_argument(
        "--disable_dp",
        action="store_true",
        help="NON-PRIVATE ceiling (train_dp_ldm.py --disable_dp: no clipping, no noise), to price privacy at equal "
        "steps. Never a result at any epsilon.",
    )
    p.add_argument(
        "--save_samples",
        type=int,
        default=0,
        help="Also write this many of the evaluated samples (balanced) to benchmarks/mnist/samples/<name>.npz "
        "(x uint8 [N, 28, 28], y int64), for re-evaluation with any classifier.",
    )
    p.add_argument("--num_samples", type=int, default=60000)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance at sampling (free).")
    p.add_argument(
        "--model_from",
        default=None,
        help="Evaluate the fine-tuned model of this earlier run, or of this model folder (e.g. a committed "
        "benchmarks/mnist/models/<run>), with no new fine-tune.",
    )
    p.add_argument(
        "--samples_of",
        default=None,
        help="Re-evaluate the committed samples of this earlier run (benchmarks/mnist/samples/<run>.npz) with no "
        "fine-tune and no sampling; the record takes the run's privacy and training fields from its own record.",
    )
    p.add_argument("--eval_epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads (1 is best on a shared machine).")
    p.add_argument("--stop_after", choices=["finetune", "evaluate", "record"], default="record")
    p.add_argument("--results", default=str(HERE / "results.json"))
    args = p.parse_args()
    if args.epsilon is None and not (args.public_only or args.disable_dp or args.samples_of):
        p.error("--epsilon is required (unless --public_only or --disable_dp)")
    if args.disable_dp and args.epsilon is not None:
        p.error("--disable_dp trains without privacy: drop --epsilon.")
    args.mnist = os.path.relpath(args.mnist, REPO)
    if not (REPO / args.mnist / "train.parquet").is_file():
        sys.exit(f"error: MNIST parquet files not found in {args.mnist}: pass --mnist.")

    out = (HERE / "runs" / args.name).relative_to(REPO)  # commands and results carry repo-relative paths
    model_dir, eval_dir = out / "model", out / "eval"
    if args.public_only:
        from dp_diffusers import DEFAULT_PUBLIC_MODEL

        model_dir = Path(os.path.relpath(args.public_model or DEFAULT_PUBLIC_MODEL, REPO))
    elif args.samples_of:
        samples_file = HERE / "samples" / f"{args.samples_of}.npz"
        earlier = [r for r in load_results(args.results) if r.get("name") == args.samples_of]
        if not samples_file.is_file() or not earlier:
            sys.exit(f"error: --samples_of {args.samples_of}: needs {samples_file} and its record in {args.results}.")
    elif args.model_from:
        given = Path(args.model_from).resolve()
        model_dir = Path(os.path.relpath(given, REPO)) if given.is_dir() else out.parent / args.model_from / "model"
        if not (REPO / model_dir / "privacy.json").is_file():
            sys.exit(f"error: --model_from {args.model_from}: no finished fine-tune in {model_dir}.")
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    python = sys.executable

    finetune = [
        python,
        "train_dp_ldm.py",
        "--dataset_name",
        args.mnist,
        "--output_dir",
        str(model_dir),
        "--train_batch_size",
        str(args.train_batch_size),
        "--max_physical_batch_size",
        str(args.max_physical_batch_size),
        "--num_train_epochs",
        str(args.num_train_epochs),
        "--lr_scheduler",
        args.lr_scheduler,
        "--max_grad_norm",
        str(args.max_grad_norm),
        "--noise_multiplicity",
        str(args.noise_multiplicity),
        "--checkpointing_steps",
        "20",
        "--checkpoints_total_limit",
        "1",
        "--resume_from_checkpoint",
        "latest",
        "--num_validation_images",
        "80",
        "--report_to",
        "none",
    ]
    finetune += ["--disable_dp"] if args.disable_dp else ["--epsilon", str(args.epsilon), "--delta", str(args.delta)]
    if args.public_model:
        finetune += ["--pretrained_model_name_or_path", args.public_model]
    if args.attention_layers:
        finetune += ["--attention_layers", args.attention_layers]
    if args.trainable_scope:
        finetune += ["--trainable_scope", args.trainable_scope]
    if args.learning_rate is not None:
        finetune += ["--learning_rate", str(args.learning_rate)]
    if args.use_lora:
        finetune += ["--use_lora"] + (["--lora_rank", str(args.lora_rank)] if args.lora_rank else [])
    stats_path = REPO / out / "finetune_stats.json"
    if args.samples_of:
        return record_samples_of(args, samples_file, earlier[0], eval_dir, env)
    if not args.public_only and not (REPO / model_dir / "privacy.json").is_file():
        resumed = (REPO / model_dir).is_dir()
        run(finetune, env)
        # Peak resident memory of the fine-tune process (the only child waited for so far), in MiB.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = {"peak_rss_mib": round(peak, 1), "resumed": resumed}
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    if args.stop_after == "finetune":
        return

    evaluate = [
        python,
        "examples/evaluate.py",
        "--pipeline",
        str(model_dir),
        "--num_samples",
        str(args.num_samples),
        "--num_inference_steps",
        str(args.num_inference_steps),
        "--eta",
        str(args.eta),
        "--guidance_scale",
        str(args.guidance_scale),
        "--real_test",
        args.mnist,
        "--output_dir",
        str(eval_dir),
        "--epochs",
        str(args.eval_epochs),
        "--seeds",
        *map(str, args.seeds),
    ]
    if not args.public_only:
        evaluate += ["--privacy_json", str(model_dir / "privacy.json")]
    if args.threads:
        evaluate += ["--num_threads", str(args.threads)]
    if not (REPO / eval_dir / "metrics.json").is_file():
        run(evaluate, env)
    if args.stop_after == "evaluate":
        return

    privacy = {} if args.public_only else json.loads((REPO / model_dir / "privacy.json").read_text())
    metrics = json.loads((REPO / eval_dir / "metrics.json").read_text())
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    if args.save_samples:
        save_samples(REPO / eval_dir / "samples.npz", HERE / "samples" / f"{args.name}.npz", args.save_samples)
    steps = privacy.get("steps")
    record = {
        "name": args.name,
        "epsilon": privacy.get("epsilon"),
        "target_epsilon": privacy.get("target_epsilon"),
        "delta": privacy.get("delta"),
        "accuracy_mean": metrics["accuracy_mean"],
        "accuracy_std": metrics["accuracy_std"],
        "classifier": metrics.get("classifier"),
        "seeds": metrics.get("seeds"),
        "fid_inception": metrics.get("fid_inception"),
        "fd_classifier": metrics.get("fd_classifier"),
        "dp_finetune_seconds": privacy.get("train_seconds"),
        "dp_seconds_per_step": round(privacy["train_seconds"] / steps, 3)
        if steps and privacy.get("train_seconds")
        else None,
        # Over all resumed runs (train_dp_ldm.py carries it in checkpoints); the last process's share beside it.
        "dp_finetune_seconds_last_run": privacy.get("train_seconds_this_run"),
        "resumed": stats.get("resumed"),
        "peak_rss_mib": stats.get("peak_rss_mib"),
        "evaluation_seconds": metrics.get("seconds"),
        # Drawing the samples alone (the last evaluation process's share when it resumed).
        "sampling_seconds": metrics.get("sampling_seconds"),
        "hardware": hardware(),
        "trained_modules": privacy.get("trained_modules"),
        "trainable_parameters": privacy.get("trainable_parameters"),
        "trainable_scope": args.trainable_scope,
        "learning_rate": args.learning_rate,
        "use_lora": args.use_lora,
        "disable_dp": args.disable_dp,
        "noise_multiplicity": privacy.get("noise_multiplicity"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "sample_rate": privacy.get("sample_rate"),
        "steps": steps,
        "epochs": privacy.get("epochs"),
        "num_samples": args.num_samples,
        "num_inference_steps": args.num_inference_steps,
        "eta": args.eta,
        "guidance_scale": args.guidance_scale,
        "attention_layers": args.attention_layers,
        "base_model": privacy.get("base_model", str(model_dir)),
        "public_only": args.public_only,
        "samples_file": f"benchmarks/mnist/samples/{args.name}.npz" if args.save_samples else None,
        "command": ("" if args.model_from or args.public_only else shlex.join(finetune[1:]) + "  &&  ")
        + shlex.join(evaluate[1:]),
        "benchmark_command": shlex.join(["python", "benchmarks/mnist/run.py", *sys.argv[1:]]),
    }
    trained_with = REPO / model_dir / "training_args.json"
    if not args.public_only and trained_with.is_file():  # what trained, as the fine-tune ran (also for --model_from)
        ran = json.loads(trained_with.read_text())
        record.update({k: ran.get(k) for k in ("trainable_scope", "use_lora", "attention_layers", "learning_rate")})
    write_record(args.results, record)


def load_results(path: str) -> list[dict]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else []


def write_record(path: str, record: dict) -> None:
    results = [r for r in load_results(path) if r.get("name") != record["name"]] + [record]
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def record_samples_of(args, samples_file: Path, earlier: dict, eval_dir: Path, env: dict) -> None:
    """--samples_of: the same classifier protocol on an earlier run's committed samples (post-processing only)."""
    evaluate = [sys.executable, "examples/evaluate.py", "--samples", str(samples_file.relative_to(REPO))]
    evaluate += ["--real_test", args.mnist, "--output_dir", str(eval_dir), "--epochs", str(args.eval_epochs)]
    evaluate += ["--seeds", *map(str, args.seeds)] + (["--num_threads", str(args.threads)] if args.threads else [])
    if not (REPO / eval_dir / "metrics.json").is_file():
        run(evaluate, env)
    if args.stop_after == "evaluate":
        return
    metrics = json.loads((REPO / eval_dir / "metrics.json").read_text())
    import numpy as np

    with np.load(samples_file) as data:
        count = int(len(data["y"]))
    measured = ("accuracy_mean", "accuracy_std", "classifier", "seeds", "fid_inception", "fd_classifier")
    record = {
        **earlier,  # what ran to make the samples: privacy, training, sampler, fine-tune time
        "name": args.name,
        **{k: metrics.get(k) for k in measured},
        "samples_of": args.samples_of,
        "num_samples": count,
        "evaluation_seconds": metrics.get("seconds"),
        "sampling_seconds": None,  # the samples were drawn by the earlier run's evaluation
        "evaluation_hardware": hardware(),  # "hardware" stays the earlier run's (its fine-tune time)
        "samples_file": str(samples_file.relative_to(REPO)),
        "command": shlex.join(evaluate[1:]),
        "benchmark_command": shlex.join(["python", "benchmarks/mnist/run.py", *sys.argv[1:]]),
    }
    record.pop("repeat_note", None)
    write_record(args.results, record)


if __name__ == "__main__":
    main()
