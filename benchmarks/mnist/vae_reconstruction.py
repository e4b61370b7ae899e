#!/usr/bin/env python
"""Is a prior's autoencoder the limit? Round-trips real MNIST test images through each public prior's frozen VAE.

    python benchmarks/mnist/vae_reconstruction.py --num_images 2000

DP fine-tuning never touches the autoencoder, so its reconstructions bound what any fine-tuned denoiser can draw.
For each prior this prints the mean squared error and PSNR (images in [-1, 1], peak-to-peak 2) of
``decode(encode(x).mode())``, and the accuracy of a CNN trained on real MNIST on the originals and on the
reconstructions (one seed of the protocol's CNN, trained on the 60,000 real training images). A reconstruction
accuracy close to the originals' says the autoencoder keeps what tells digits apart, and the gap to the goal lies in
the denoiser. Evaluation only: nothing here trains a released model, and the numbers are statistics of MNIST's
public test set.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

import dp_diffusers
from dp_diffusers.evaluation.classifier import to_model_input
from dp_diffusers.evaluation.downstream import accuracy, train_classifier
from dp_diffusers.evaluation.real_data import load_labelled_images

HERE = Path(__file__).resolve().parent
MNIST = HERE.parents[1].parent / "shared" / "datasets" / "mnist"
PRIORS = {
    "printed digits": str(HERE / "priors" / "public-printed-digits"),  # the default digit prior until 2026-12-03
    # the default digit prior's autoencoder too (public-drawn-digits-long and -wide reuse it bit-identical)
    "drawn digits": str(HERE / "priors" / "public-drawn-digits"),
    "procedural": dp_diffusers.GENERAL_PUBLIC_MODEL,
}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 [N, H, W, C], as DPLDMPipeline turns its images into the evaluated samples
    (diffusers' ``VaeImageProcessor.postprocess``, then rounding)."""
    images = VaeImageProcessor(do_normalize=True).postprocess(x, output_type="np")
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    out = [
        vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mode()).sample for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", default=str(MNIST), help="Folder with train.parquet and test.parquet.")
    p.add_argument("--num_images", type=int, default=2000, help="Real test images to round-trip.")
    p.add_argument("--epochs", type=int, default=3, help="Epochs of the judging CNN on real MNIST.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=str(HERE / "vae_reconstruction.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    x_test, y_test = load_labelled_images(args.mnist, split="test", max_items=args.num_images)
    x_train, y_train = load_labelled_images(args.mnist, split="train")
    judge, _ = train_classifier(x=x_train, y=y_train, num_classes=10, epochs=args.epochs, seed=0)
    rows = [{"images": "real (no round trip)", "accuracy": accuracy(judge, x_test, y_test)}]
    x = to_model_input(torch.from_numpy(x_test))  # [-1, 1], the range the priors were trained on
    for name, path in PRIORS.items():
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
        rec = round_trip(vae, x)
        mse = float(((rec.clamp(-1, 1) - x) ** 2).mean())
        rows.append(
            {
                "images": f"round trip through the {name} prior's VAE",
                "prior": Path(path).name,
                "mse": round(mse, 5),
                "psnr_db": round(10 * math.log10(4.0 / mse), 2),
                "accuracy": accuracy(judge, to_uint8(rec), y_test),
            }
        )
    print(f"{'images':<52} {'MSE':>8} {'PSNR dB':>8} {'judge accuracy':>15}")
    for r in rows:
        mse, psnr = r.get("mse", ""), r.get("psnr_db", "")
        print(f"{r['images']:<52} {mse!s:>8} {psnr!s:>8} {100 * r['accuracy']:>14.2f}%")
    record = {
        "num_images": len(x_test),
        "judge": f"the protocol's CNN, {args.epochs} epochs on the 60,000 real training images, seed 0",
        "rows": rows,
        "seconds": round(time.time() - start, 1),
        "command": f"benchmarks/mnist/vae_reconstruction.py --num_images {args.num_images} --epochs {args.epochs}",
    }
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
