#!/usr/bin/env python
"""Evaluate class-conditional samples the way DPDM / DP-LDM / DPImageBench do: downstream accuracy, FID, a report.

    python examples/evaluate.py --samples samples.npz --real_test ../shared/datasets/mnist --output_dir eval
    python examples/evaluate.py --pipeline dp-ldm-mnist --num_samples 60000 --real_test ../shared/datasets/mnist \\
        --privacy_json dp-ldm-mnist/privacy.json --output_dir eval

Samples are an ``.npz`` with ``x`` (uint8 [N, H, W, C]) and ``y`` (int labels), as ``generate_samples`` writes;
any labelled image set works, real images included (real MNIST train scores ~99%: a sanity check). With
``--pipeline`` and no ``--samples`` the samples are drawn first (resumable; DDIM, 200 steps, eta = 1 by default, as
in the DP-LDM paper).

Downstream accuracy: a CNN is trained from scratch per seed on the samples only, the best epoch is chosen on held-out
samples (1/12, i.e. 5,000 of 60,000), and only that model is scored on the real test set. ``--classifier dpib`` does
the same with DPImageBench's three classifiers (ResNet-110, WRN-40-4, ResNeXt-29 8x64d, each with DPImageBench's
recipe: Adam lr 0.01, StepLR(20, 0.2), EMA 0.9999, 50 epochs, batch 256) and reports their mean, as DPImageBench does:
``accuracy_mean`` / ``accuracy_std`` are then the mean and std over the three, ``accuracy_by_classifier`` holds each
one, ``downstream_by_classifier`` each one's full result. They need a GPU: one 55,000-image epoch on a CPU core takes
~22 min, ~1.7 h and ~9 h (measured).
FID: the standard Inception-v3 FID against the real training split when torch-fidelity or clean-fid and their
weights are on disk (never downloaded); otherwise ``fid_inception`` is null with the reason. ``fd_classifier``, a
Fréchet distance in the features of a CNN trained on the real training split, is always computed (it is not an FID).
The real training split is ``--real_train``, or the ``train`` split beside ``--real_test`` when that is a folder or
a data set name.

Writes ``OUTPUT_DIR/metrics.json`` and ``OUTPUT_DIR/report.md`` (with the sample grid).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dp_diffusers import UserInputError
from dp_diffusers.atomic import atomic_write_text
from dp_diffusers.errors import cli_message, first_line
from dp_diffusers.evaluation import (
    CLASSIFIERS,
    DPIB_CLASSIFIERS,
    class_grid,
    downstream_accuracy,
    downstream_accuracy_over,
    fd_classifier,
    generate_samples,
    inception_fid,
    load_labelled_images,
    write_report,
)
from dp_diffusers.evaluation.classifier import DPIB_RECIPE
from dp_diffusers.evaluation.downstream import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_VAL_FRACTION
from dp_diffusers.evaluation.fid import default_cache_dir
from dp_diffusers.evaluation.real_data import is_single_file
from dp_diffusers.evaluation.samples import grid_path_for, save_image

logger = logging.getLogger("evaluate")


#: ``--classifier dpib``: all three of DPImageBench's classifiers, and their mean accuracy.
DPIB = "dpib"

#: This script's flags for the library parameters its errors may name (dp_diffusers.errors.cli_message).
FLAGS = {"image_column": "--image_column", "label_column": "--label_column"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("samples")
    src.add_argument("--samples", default=None, help="Labelled samples: an .npz with x and y (or a parquet/folder).")
    src.add_argument(
        "--pipeline", default=None, help="A DPLDMPipeline folder to sample from when --samples is absent."
    )
    src.add_argument("--num_samples", type=int, default=60000, help="Samples to draw with --pipeline (balanced).")
    src.add_argument(
        "--samples_out", default=None, help="Where to write drawn samples (default OUTPUT_DIR/samples.npz)."
    )
    src.add_argument("--sample_batch_size", type=int, default=500, help="Samples per pipeline call / saved chunk.")
    src.add_argument("--num_inference_steps", type=int, default=200, help="DDIM steps (paper: 200).")
    src.add_argument("--eta", type=float, default=1.0, help="DDIM eta (paper: 1.0).")
    src.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance (paper: none, 1.0).")
    src.add_argument("--sample_seed", type=int, default=0, help="Base seed of sampling.")

    real = p.add_argument_group("real data")
    real.add_argument("--real_test", required=True, help="Real test images: a folder, .parquet, .npz or dataset name.")
    real.add_argument("--real_train", default=None, help="Real training images (FID reference); see above.")
    real.add_argument("--image_column", default=None, help="Image column of the real data (default: guessed).")
    real.add_argument("--label_column", default=None, help="Label column of the real data (default: guessed).")

    acc = p.add_argument_group("downstream accuracy")
    acc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="One classifier per seed.")
    recipes = "cnn/resnet {}, dpib* {}".format  # the classifiers' training recipes
    acc.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"Classifier training epochs (default: {recipes(DEFAULT_EPOCHS, DPIB_RECIPE.epochs)}).",
    )
    acc.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"Classifier batch size (default: {recipes(DEFAULT_BATCH_SIZE, DPIB_RECIPE.batch_size)}).",
    )
    acc.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"Classifier learning rate, Adam (default: {recipes(DEFAULT_LR, DPIB_RECIPE.lr)}).",
    )
    acc.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, help="Held-out share of samples.")
    acc.add_argument(
        "--classifier",
        default="cnn",
        choices=(*CLASSIFIERS, DPIB),
        help="cnn (MNIST-like), resnet (RGB), one of DPImageBench's dpib_resnet / dpib_wrn / dpib_resnext, or dpib: "
        "all three and their mean.",
    )
    acc.add_argument("--max_train", type=int, default=None, help="Use a random subset (seed 0) of this many samples.")

    fd = p.add_argument_group("Fréchet distances")
    fd.add_argument("--skip_fd", action="store_true", help="Skip the Inception FID and fd_classifier.")
    fd.add_argument(
        "--inception_weights", default=None, help="Inception weights file (.pth torch-fidelity, .pt clean-fid)."
    )
    fd.add_argument("--fd_epochs", type=int, default=5, help="Epochs of fd_classifier's feature CNN (cached).")
    fd.add_argument(
        "--cache_dir", default=None, help=f"Cache of reference statistics (default {default_cache_dir()})."
    )

    p.add_argument("--output_dir", required=True, help="Where metrics.json and report.md go.")
    p.add_argument("--privacy_json", default=None, help="privacy.json of the DP training run, shown in the report.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine).")
    p.add_argument("--no_progress", action="store_true", help="No progress bars.")
    return p.parse_args(argv)


def _samples(args, out: Path) -> tuple[np.ndarray, np.ndarray, str, str | None, float | None]:
    """``(x, y, source, grid path or None, sampling seconds or None)``: loaded from --samples or drawn from
    --pipeline (the seconds are this process's share: a resumed run draws only the chunks that were missing)."""
    if args.samples:
        x, y = load_labelled_images(args.samples, split="train")
        return x, y, args.samples, None, None
    if not args.pipeline:
        raise UserInputError("Pass --samples FILE.npz, or --pipeline FOLDER (with --num_samples) to draw samples.")
    from dp_diffusers import DPLDMPipeline

    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components"
    try:
        pipe = DPLDMPipeline.from_pretrained(args.pipeline).to(args.device)
    except Exception as e:  # diffusers raises many types; the user needs one line and the fix
        hint = "no model_index.json there" if not Path(args.pipeline, "model_index.json").is_file() else first_line(e)
        raise UserInputError(
            f"Could not load a DPLDMPipeline from --pipeline {args.pipeline!r} ({hint}): pass a folder written by "
            "train_dp_ldm.py, pretrain_public_ldm.py or save_pretrained, or a Hub repo id."
        ) from e
    path = args.samples_out or str(out / "samples.npz")
    start = time.perf_counter()
    generate_samples(
        pipe,
        num_samples=args.num_samples,
        output_path=path,
        batch_size=args.sample_batch_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        seed=args.sample_seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    x, y = load_labelled_images(path)
    return x, y, path, grid_path_for(path), seconds


def _real_train(args) -> tuple[np.ndarray | None, np.ndarray | None, str | None, str | None]:
    """``(x, y, source, None)`` of the real training split, or ``(None, None, None, reason)``."""
    kw = {"image_column": args.image_column, "label_column": args.label_column}
    if args.real_train:
        return (*load_labelled_images(args.real_train, split="train", **kw), args.real_train, None)
    if is_single_file(args.real_test):
        return None, None, None, "no real training split: pass --real_train"
    try:
        return (*load_labelled_images(args.real_test, split="train", **kw), f"{args.real_test} (train)", None)
    except UserInputError as e:
        return None, None, None, f"no real training split beside --real_test ({e}); pass --real_train"


def _read_privacy(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserInputError(f"No such privacy file: {path!r}.") from e
    except (OSError, ValueError) as e:
        raise UserInputError(f"{path} is not a readable JSON file ({e}).") from e


def main(args) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    privacy = _read_privacy(args.privacy_json)  # fail early on a bad path
    progress = not args.no_progress
    start = time.perf_counter()

    x, y, source, grid, sampling_seconds = _samples(args, out)
    n_samples = len(x)
    if args.max_train is not None:
        if args.max_train < 2:
            raise UserInputError(f"--max_train must be >= 2, got {args.max_train}.")
        if args.max_train < len(x):
            keep = np.sort(np.random.default_rng(0).choice(len(x), args.max_train, replace=False))
            x, y = x[keep], y[keep]
    if grid is None or not Path(grid).is_file():
        grid = save_image(class_grid(x, y, per_class=10), out / "samples_grid.png")
    kw = {"image_column": args.image_column, "label_column": args.label_column}
    test_x, test_y = load_labelled_images(args.real_test, split="test", **kw)
    logger.info("samples %s %s, real test %s %s", source, x.shape, args.real_test, test_x.shape)

    metrics = {"samples": source, "num_samples": n_samples, "real_test": args.real_test}
    if sampling_seconds is not None:
        metrics["sampling_seconds"] = sampling_seconds
    settings = dict(
        train_x=x,
        train_y=y,
        test_x=test_x,
        test_y=test_y,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        device=args.device,
        progress=progress,
    )
    if args.classifier == DPIB:
        metrics.update(classifier=DPIB, **downstream_accuracy_over(classifiers=DPIB_CLASSIFIERS, **settings))
    else:
        metrics.update(downstream_accuracy(classifier=args.classifier, **settings))
    metrics["accuracy_seconds"] = metrics.pop("seconds")

    if args.skip_fd:
        metrics.update(fid_inception=None, fid_inception_unavailable_reason="skipped (--skip_fd)")
        metrics.update(fd_classifier=None, fd_classifier_skipped_reason="skipped (--skip_fd)")
    else:
        real_x, real_y, real_source, reason = _real_train(args)
        metrics["real_train"] = real_source
        if real_x is None:
            metrics.update(fid_inception=None, fid_inception_unavailable_reason=reason)
            metrics.update(fd_classifier=None, fd_classifier_skipped_reason=reason)
        else:
            cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
            digest = hashlib.sha256(real_x.tobytes()).hexdigest()[:16]
            fid, reason = inception_fid(
                samples=x,
                reference=real_x,
                reference_stats=str(cache / "inception" / f"{digest}.npz"),
                weights_path=args.inception_weights,
                device=args.device,
                progress=progress,
            )
            metrics.update(fid_inception=fid, fid_inception_unavailable_reason=reason)
            metrics["fd_classifier"] = fd_classifier(
                samples=x,
                real_x=real_x,
                real_y=real_y,
                cache_dir=cache,
                epochs=args.fd_epochs,
                device=args.device,
                progress=progress,
            )
    if privacy is not None:
        metrics["privacy_json"] = args.privacy_json
        for key in ("epsilon", "delta"):
            if isinstance(privacy.get(key), (int, float)):
                metrics[key] = privacy[key]
    metrics["seconds"] = time.perf_counter() - start

    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    report = write_report(output_dir=out, metrics=metrics, privacy=privacy, grid_path=grid)
    summary = f"accuracy {metrics['accuracy_mean']:.2f} ± {metrics['accuracy_std']:.2f} % ({args.classifier})"
    if "accuracy_by_classifier" in metrics:
        summary += " = mean of " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["accuracy_by_classifier"].items())
    if metrics.get("fid_inception") is not None:
        summary += f", FID {metrics['fid_inception']:.2f}"
    if metrics.get("fd_classifier") is not None:
        summary += f", fd_classifier {metrics['fd_classifier']:.3f}"
    print(f"{summary}\nwrote {out / 'metrics.json'} and {report}")
    return metrics


def cli(argv=None) -> int:
    """Runs the evaluation; a :class:`UserInputError` becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        main(parse_args(argv))
    except UserInputError as e:
        print(f"error: {cli_message(e, FLAGS)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
