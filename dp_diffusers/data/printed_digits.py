"""Printed digits: a PUBLIC, non-sensitive image set rendered from the fonts bundled with matplotlib.

It stands in, offline, for SVHN, the public data set of the DP-LDM paper's SVHN -> MNIST experiment (pre-train on
public digits, fine-tune with DP-SGD on private handwritten digits). No person contributed these images: they are
computer-rendered glyphs of freely licensed fonts (DejaVu, STIX, BaKoMa Computer Modern), so training on them costs
no privacy budget.

Images follow MNIST's framing: a white digit on a black background, scaled to fit a 20x20 box (for 28x28 images)
and placed so its centre of mass lies at the image centre. Random augmentations (font, affine transform, stroke
width, blur, noise) give the set the variety that handwriting has.

Every image draws its randomness from its own generator seeded with ``(seed, index)``, so the set does not depend
on batch size, worker count or how many images are generated.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import datasets
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .generated import generate_image_set

_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"

# Fonts whose code points "0".."9" draw ordinary lining digits (checked by rendering every one). Left out:
# DejaVu*Display (no digit glyphs), LastResortHE (a box for every character), STIXNonUni* and STIXSiz* (no digits
# there), cmex10 and cmsy10 (symbols at those code points) and cmmi10 (old-style figures that drop below the
# baseline, unlike MNIST).
_FONT_NAMES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)

#: The font files the digits are rendered with (those of the list above that this matplotlib ships).
PRINTED_DIGITS_FONTS: list[str] = [str(_FONT_DIR / name) for name in _FONT_NAMES if (_FONT_DIR / name).is_file()]

_CLASS_NAMES = [str(d) for d in range(10)]
_RENDER_SIZE = 96  # font size (px) of the high-resolution rendering that is later shrunk to the digit box


@functools.cache
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _RENDER_SIZE)


def _glyph(digit: int, font_path: str, stroke: int) -> Image.Image:
    """The digit drawn white on black at high resolution, with a margin for the affine transform."""
    font = _font(font_path)
    text = str(digit)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    pad = _RENDER_SIZE // 2
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text(
        (pad - left, pad - top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255
    )
    return canvas


def _random_affine(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotation (+-15 deg), shear (+-0.3) and anisotropic scale (0.8..1.2) about the image centre."""
    angle = math.radians(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.3, 0.3)
    sx, sy = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    cos, sin = math.cos(angle), math.sin(angle)
    # Forward map (output <- input) = R @ Shear @ Scale; PIL wants the inverse (input coords of an output pixel).
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inverse = np.linalg.inv(forward)
    w, h = image.size
    cx, cy = w / 2.0, h / 2.0
    # Output canvas large enough to hold the transformed corners.
    corners = np.array([[-cx, -cy], [cx, -cy], [-cx, cy], [cx, cy]]) @ forward.T
    ow, oh = (int(math.ceil(2 * np.abs(corners[:, i]).max())) + 2 for i in (0, 1))
    ocx, ocy = ow / 2.0, oh / 2.0
    a, b, d, e = inverse[0, 0], inverse[0, 1], inverse[1, 0], inverse[1, 1]
    coeffs = (a, b, cx - a * ocx - b * ocy, d, e, cy - d * ocx - e * ocy)
    return image.transform((ow, oh), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)


def render_digit(
    digit: int, *, rng: np.random.Generator, image_size: int = 28, font: str | None = None
) -> Image.Image:
    """Renders one randomly augmented printed ``digit`` (0-9) as a mode-"L" ``image_size`` square, MNIST-style.

    Draws a font (unless ``font``, one of ``PRINTED_DIGITS_FONTS``, is given), a stroke width, an affine transform
    (rotation, shear, scale), a digit box of about ``20/28 * image_size`` pixels, a small translation, blur and
    noise from ``rng``.
    """
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if not PRINTED_DIGITS_FONTS:
        raise RuntimeError(f"No usable digit fonts found in {_FONT_DIR}")
    index = int(rng.integers(len(PRINTED_DIGITS_FONTS)))  # drawn even when `font` is given: same stream after it
    font_path = PRINTED_DIGITS_FONTS[index] if font is None else font
    # A stroke of 0..4 px at the rendering's scale thickens the lines by up to ~1.5 px once shrunk to a 20 px box.
    stroke = int(rng.integers(0, 5))
    glyph = _random_affine(_glyph(int(digit), font_path, stroke), rng)

    # Scale the longer side to the digit box, as MNIST does (20 px of 28), with a little random variation.
    image = centre_in_frame(glyph, rng=rng, image_size=image_size, box=(17.0, 21.0))
    return blur_and_noise(image, rng=rng, image_size=image_size)


def centre_in_frame(
    image: Image.Image, *, rng: np.random.Generator, image_size: int, box: tuple[float, float]
) -> Image.Image:
    """Crops a white-on-black mode-"L" ``image`` to its ink, scales its longer side to ``box`` pixels of a 28-pixel
    frame (drawn uniformly from the range, scaled to ``image_size``) and places its centre of mass at the frame's
    centre, plus a translation of up to ~1.5 px (at 28 px): MNIST's framing."""
    bbox = image.point(lambda v: 255 if v > 32 else 0).getbbox()
    if bbox is None:  # no ink (cannot happen with the kept fonts and shapes; guard anyway)
        return Image.new("L", (image_size, image_size), 0)
    image = image.crop(bbox)
    side = image_size * rng.uniform(*box) / 28.0
    w, h = image.size
    ratio = side / max(w, h)
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    small = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)

    total = small.sum()
    ys, xs = np.indices(small.shape)
    com_y, com_x = (ys * small).sum() / total, (xs * small).sum() / total
    jitter = image_size * 1.5 / 28.0
    top = round(image_size / 2.0 - com_y - 0.5 + rng.uniform(-jitter, jitter))
    left = round(image_size / 2.0 - com_x - 0.5 + rng.uniform(-jitter, jitter))
    out = np.zeros((image_size, image_size), dtype=np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + small.shape[0], image_size), min(left + small.shape[1], image_size)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def blur_and_noise(image: Image.Image, *, rng: np.random.Generator, image_size: int) -> Image.Image:
    """A light Gaussian blur (radius up to 0.7 px at 28 px) and, half of the time, pixel noise (std up to 8)."""
    radius = rng.uniform(0.0, 0.7) * image_size / 28.0
    if radius > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    noise_std = rng.uniform(0.0, 8.0)
    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels + rng.normal(0.0, noise_std, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def make_printed_digits(
    num_images: int, *, seed: int = 0, image_size: int = 28, num_proc: int | None = None
) -> datasets.Dataset:
    """Renders ``num_images`` printed digits as a ``datasets.Dataset`` with columns ``image`` and ``label``.

    Image ``i`` shows digit ``i % 10`` (so every prefix is balanced) and is a pure function of ``(seed, i)``.
    ``label`` is a ``ClassLabel`` named "0".."9". 10,000 images take a few seconds on one CPU core; ``num_proc``
    renders in that many processes (the same images).
    """
    return generate_image_set(
        num_images,
        render=functools.partial(_render_indexed, seed=seed, image_size=image_size),
        class_names=_CLASS_NAMES,
        desc="Rendering printed digits",
        num_proc=num_proc,
    )


def _render_indexed(index: int, digit: int, *, seed: int, image_size: int) -> Image.Image:
    return render_digit(digit, rng=_image_rng(seed, index), image_size=image_size)
