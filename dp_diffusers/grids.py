"""Sample grids (PNG) from a class-conditional pipeline: one row per class."""

from __future__ import annotations

import torch
from diffusers.utils import make_image_grid
from PIL import Image


def pipeline_class_grid(
    pipe, *, per_class: int = 8, num_inference_steps: int = 50, guidance_scale: float = 1.0, seed: int = 0
) -> Image.Image:
    """Samples ``per_class`` images of every class of ``pipe`` and lays them out one class per row."""
    classes = sorted(pipe.id2label)
    labels = [c for c in classes for _ in range(per_class)]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(
        class_labels=labels,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pil",
    ).images
    return make_image_grid(images, rows=len(classes), cols=per_class)
