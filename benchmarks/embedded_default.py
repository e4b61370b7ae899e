#!/usr/bin/env python
"""How close a pipeline's samples are to the embedded private digits (scikit-learn's), compared with another.

    python benchmarks/embedded_default.py dp_diffusers/assets/public-drawn-digits dp-ldm-output
    python benchmarks/embedded_default.py dp-ldm-output --guidance_scale 1 2 3   # one reading per scale
    python benchmarks/embedded_default.py PUBLIC PRIVATE --guidance_scale 2 --grid_dir docs/images  # + README grids

For each pipeline (and guidance scale): 50 samples per class (DDIM 50 steps, eta 1, seed 0), then
  - private_classifier_accuracy: an RBF-SVM trained on the 1,797 private digits labels the samples; the share
    labelled with their own class (class-conditional fidelity in the private style);
  - fd_pixels_pca: Fréchet distance to the private digits in the 32-d PCA space of the private digits' pixels
    (lower = closer to the private distribution);
  - mnist_judge_correct (when ../shared/datasets/mnist is present): the share of the samples that a CNN trained on
    real MNIST (DPDM's small CNN, 3 epochs on the 60,000 training images, seed 0; its accuracy on MNIST's test set
    is printed) reads as the class they were asked for. The same judge reads the first 50 private digits of each
    class, for the private data's own level.
These read the private set, so they are for showing what the embedded demo does, not for tuning on private data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from dp_diffusers import DPLDMPipeline
from dp_diffusers.data import as_torch_dataset, load_image_dataset
from dp_diffusers.evaluation.downstream import accuracy, predict, train_classifier
from dp_diffusers.evaluation.fid import compute_stats, frechet_distance
from dp_diffusers.evaluation.real_data import load_labelled_images
from dp_diffusers.grids import pipeline_class_grid


def private_digits() -> tuple[np.ndarray, np.ndarray]:
    ds = as_torch_dataset(load_image_dataset("digits"), resolution=28, channels=1)
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))]).numpy().reshape(len(ds), -1)
    y = np.array([int(ds[i]["labels"]) for i in range(len(ds))])
    return (x + 1) / 2, y


MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def mnist_judge():
    """A CNN trained on real MNIST, or None where ../shared is absent; prints its test accuracy."""
    if not (MNIST / "train.parquet").is_file():
        print("../shared/datasets/mnist is absent: no MNIST judge", file=sys.stderr)
        return None
    xtr, ytr = load_labelled_images(str(MNIST / "train.parquet"), split="train")
    xte, yte = load_labelled_images(str(MNIST / "test.parquet"), split="train")
    model, _ = train_classifier(x=xtr, y=ytr, num_classes=10, epochs=3, seed=0, progress=False)
    print(f"MNIST judge: test accuracy {accuracy(model, xte, yte):.4f}", file=sys.stderr)
    return model


def as_uint8(images: np.ndarray) -> np.ndarray:
    """[N, 784] floats in [0, 1] -> uint8 [N, 28, 28, 1]."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8).reshape(-1, 28, 28, 1)


def write_grids(grid_dir: Path, paths: list[str], x: np.ndarray, y: np.ndarray, guidance_scale: float) -> None:
    """The README's grids, 8 per class: the private digits themselves (the first 8 of each class), then each
    pipeline (DDIM 50 steps, seed 0, ``guidance_scale``) as ``embedded_default_<public|private>.png``."""
    grid_dir.mkdir(parents=True, exist_ok=True)
    first = [i for c in range(10) for i in np.flatnonzero(y == c)[:8]]
    tiles = [Image.fromarray(as_uint8(x[i : i + 1])[0, :, :, 0]) for i in first]
    make_image_grid(tiles, rows=10, cols=8).save(grid_dir / "embedded_default_data.png")
    for path, name in zip(paths, ("public", "private"), strict=False):
        pipe = DPLDMPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        grid = pipeline_class_grid(pipe, per_class=8, num_inference_steps=50, guidance_scale=guidance_scale, seed=0)
        grid.save(grid_dir / f"embedded_default_{name}.png")


def main(paths: list[str], guidance_scales: list[float], grid_dir: str | None = None) -> None:
    x, y = private_digits()
    if grid_dir:
        write_grids(Path(grid_dir), paths, x, y, guidance_scales[0])
    judge = mnist_judge()
    svm = SVC(C=10).fit(x, y)
    pca = PCA(32, random_state=0).fit(x)
    ref = compute_stats(pca.transform(x))
    labels = [c for c in range(10) for _ in range(50)]
    out = {}
    if judge is not None:
        first = np.concatenate([np.flatnonzero(y == c)[:50] for c in range(10)])
        out["private digits (first 50 per class)"] = {
            "mnist_judge_correct": float((predict(judge, as_uint8(x[first])) == y[first]).mean())
        }
    for path in paths:
        pipe = DPLDMPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        for scale in guidance_scales:
            images = pipe(
                class_labels=labels,
                num_inference_steps=50,
                eta=1.0,
                guidance_scale=scale,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images.reshape(len(labels), -1)
            key = path if guidance_scales == [1.0] else f"{path} (guidance_scale {scale:g})"
            out[key] = {
                "private_classifier_accuracy": float((svm.predict(images) == np.asarray(labels)).mean()),
                "fd_pixels_pca": float(frechet_distance(*compute_stats(pca.transform(images)), *ref)),
            }
            if judge is not None:
                correct = predict(judge, as_uint8(images)) == np.asarray(labels)
                out[key]["mnist_judge_correct"] = float(correct.mean())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+", help="DPLDMPipeline folders (or Hub ids).")
    parser.add_argument(
        "--guidance_scale", type=float, nargs="+", default=[1.0], help="Classifier-free guidance scales to read."
    )
    parser.add_argument(
        "--grid_dir",
        default=None,
        help="Also write the README's grids here: the private digits, then the first two pipelines (public, "
        "private) at the first guidance scale.",
    )
    args = parser.parse_args()
    main(args.pipelines, args.guidance_scale, args.grid_dir)
