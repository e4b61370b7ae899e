"""Procedural shapes: a PUBLIC, domain-general image set made by code alone, with no digit in it.

The shipped digit prior only knows digits; users' private images rarely look like them. Pre-training on
images that a program draws (published practice: DP-SynGen, arXiv 2412.09842, and "learning to see by looking at
noise", Baradad et al. 2021) gives a prior for whatever the private data are: it has seen strokes, outlines,
filled silhouettes, textures and the glyphs of many scripts, and no person's data. It holds no digit: no digit
code point (any Unicode category N*, any character with a numeric value or "DIGIT"/"NUMBER" in its name) and no
glyph drawn like a digit: those whose shape correlates above ``_MAX_DIGIT_LIKENESS`` with a digit of the same font
(O, S, B, Θ, В, ...), and the few listed in ``_DIGIT_LOOKALIKES`` (I, l, Z, ...).

Ten classes, one per kind of image (``PROCEDURAL_CLASSES``), so that a private set of up to ten classes maps onto
the class embedder row by row; every image is white-ish ink on black at MNIST's framing (``centre_in_frame``), drawn
at 4x and shrunk (anti-aliasing), with random ink level, blur and noise. Image ``i`` has class ``i % 10`` and is a
pure function of ``(seed, i)``, as ``make_printed_digits``.
"""

from __future__ import annotations

import functools
import math
import string
import unicodedata

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .generated import generate_image_set
from .printed_digits import _FONT_DIR, PRINTED_DIGITS_FONTS, _random_affine, blur_and_noise, centre_in_frame

PROCEDURAL_CLASSES = (
    "ellipse",
    "polygon",
    "star",
    "stroke",
    "lines",
    "texture",
    "blob",
    "latin_letter",
    "glyph",
    "composition",
)
_HI = 112  # the canvas side of the 4x drawing

# Letters drawn like digits in common fonts (0 1 2 5 6 8 9 and friends), left out so the set has no digit shapes.
_DIGIT_LOOKALIKES = frozenset("OoDQIlijZzSsBGbgq|ЗзЅѕОоІіЈјБбΟοΙιΖζΒβϬϭ")
# Scripts' glyph fonts shipped with matplotlib (DejaVu covers Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic,
# symbols; STIX covers mathematical symbols).
_GLYPH_FONT_NAMES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
)
_GLYPH_CATEGORIES = frozenset({"Lu", "Ll", "Lo", "Sm", "So"})


def is_digit_like(char: str) -> bool:
    """True for any digit or number code point, and for the letters in ``_DIGIT_LOOKALIKES``."""
    name = unicodedata.name(char, "")
    return (
        unicodedata.category(char).startswith("N")
        or unicodedata.numeric(char, None) is not None
        or "DIGIT" in name
        or "NUMBER" in name
        or "NUMERAL" in name
        or char in _DIGIT_LOOKALIKES
    )


#: A glyph whose shape correlates above this with a digit of the same font is left out (see ``_digit_likeness``):
#: it catches O/o (0.87/0.93), S (0.85), B (0.92), g (0.77) and their look-alikes in other scripts (Θ, Օ, В, ɡ, ...),
#: about 8% of the glyphs; ``_DIGIT_LOOKALIKES`` names the few that fall below it (I, l, Z, ...).
_MAX_DIGIT_LIKENESS = 0.75


def _shape(char: str, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    """The glyph cropped to its ink, 16x16, zero-mean, unit-norm (None for an empty glyph)."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), char, font=font, fill=255)
    shape = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    shape -= shape.mean()
    norm = np.linalg.norm(shape)
    return shape / norm if norm > 0 else None


def _digit_likeness(chars: tuple[str, ...], font_path: str) -> dict[str, float]:
    """Each drawable glyph's highest correlation with the digits 0-9 drawn in the same font (public fonts only)."""
    font = ImageFont.truetype(font_path, 32)
    digits = np.stack([_shape(str(d), font) for d in range(10)])
    shapes = {c: _shape(c, font) for c in chars}
    return {c: float((digits @ s).max()) for c, s in shapes.items() if s is not None}


def _digit_free(chars, font_path: str) -> tuple[str, ...]:
    likeness = _digit_likeness(tuple(c for c in chars if not is_digit_like(c)), font_path)
    return tuple(c for c, value in likeness.items() if value <= _MAX_DIGIT_LIKENESS)


@functools.cache
def _glyph_table() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(font path, the non-ASCII letters and symbols it maps that do not look like digits) for each glyph font
    this matplotlib ships. Takes ~8 s once per process."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    table = []
    for name in _GLYPH_FONT_NAMES:
        path = _FONT_DIR / name
        if not path.is_file():
            continue
        mapped = (chr(c) for c in sorted(TTFont(str(path)).getBestCmap()))
        chars = _digit_free((c for c in mapped if ord(c) > 127 and unicodedata.category(c) in _GLYPH_CATEGORIES), path)
        if chars:
            table.append((str(path), chars))
    return tuple(table)


@functools.cache
def _latin_letters(font_path: str) -> tuple[str, ...]:
    """The ASCII letters that do not look like digits in this font."""
    return _digit_free(string.ascii_letters, font_path)


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _ink(rng: np.random.Generator) -> int:
    return int(rng.uniform(0.55, 1.0) * 255)


def _width(rng: np.random.Generator) -> int:
    """A line width of 0.75..2.75 px at 28 px."""
    return int(rng.uniform(3, 11))


def _points_on_ellipse(rng, n: int, *, jitter: float = 0.0) -> list[tuple[float, float]]:
    c, r = _HI / 2, _HI * rng.uniform(0.3, 0.45)
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.sort(rng.uniform(0, 2 * math.pi, n)) if jitter else start + np.arange(n) * 2 * math.pi / n
    radii = r * (1 + jitter * rng.uniform(-1, 1, n))
    return [(c + rr * math.cos(a), c + rr * math.sin(a)) for a, rr in zip(angles, radii, strict=True)]


def _ellipse(rng, canvas: Image.Image) -> None:
    draw = ImageDraw.Draw(canvas)
    c = _HI / 2
    a, b = _HI * rng.uniform(0.15, 0.45), _HI * rng.uniform(0.08, 0.45)
    box = (c - a, c - b, c + a, c + b)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=_ink(rng))
    else:
        draw.ellipse(box, outline=_ink(rng), width=_width(rng))


def _polygon(rng, canvas: Image.Image) -> None:
    draw = ImageDraw.Draw(canvas)
    points = _points_on_ellipse(rng, int(rng.integers(3, 9)), jitter=0.25)
    if rng.random() < 0.5:
        draw.polygon(points, fill=_ink(rng))
    else:
        draw.line(points + points[:1], fill=_ink(rng), width=_width(rng), joint="curve")


def _star(rng, canvas: Image.Image) -> None:
    draw = ImageDraw.Draw(canvas)
    n, inner = int(rng.integers(3, 9)), rng.uniform(0.2, 0.6)
    c, r, start = _HI / 2, _HI * rng.uniform(0.3, 0.45), rng.uniform(0, 2 * math.pi)
    points = [
        (c + r * (1 if k % 2 == 0 else inner) * math.cos(start + k * math.pi / n),
         c + r * (1 if k % 2 == 0 else inner) * math.sin(start + k * math.pi / n))
        for k in range(2 * n)
    ]  # fmt: skip
    if rng.random() < 0.6:
        draw.polygon(points, fill=_ink(rng))
    else:
        draw.line(points + points[:1], fill=_ink(rng), width=_width(rng), joint="curve")


def _catmull_rom(points: np.ndarray, samples: int = 12) -> list[tuple[float, float]]:
    """A smooth curve through ``points`` (Catmull-Rom spline, end points repeated)."""
    p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, samples, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    out.append(p[-2][None])
    return [tuple(xy) for xy in np.concatenate(out)]


def _stroke(rng, canvas: Image.Image) -> None:
    """One or two pen strokes: smooth curves through random points, as a hand would draw them."""
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        n = int(rng.integers(3, 7))
        steps = rng.normal(0, _HI * 0.25, size=(n, 2))
        points = np.clip(_HI / 2 + np.cumsum(steps, axis=0) - steps.mean(0) * np.arange(1, n + 1)[:, None], 8, _HI - 8)
        curve, width, ink = _catmull_rom(points), _width(rng), _ink(rng)
        draw.line(curve, fill=ink, width=width, joint="curve")
        for x, y in (curve[0], curve[-1]):  # round pen ends
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=ink)


def _lines(rng, canvas: Image.Image) -> None:
    """Straight segments: a few at random, parallel bars, a grid or a cross."""
    draw = ImageDraw.Draw(canvas)
    ink, width, kind = _ink(rng), _width(rng), int(rng.integers(4))
    if kind == 0:
        for _ in range(int(rng.integers(2, 6))):
            draw.line(
                [tuple(rng.uniform(10, _HI - 10, 2)), tuple(rng.uniform(10, _HI - 10, 2))], fill=ink, width=width
            )
        return
    angle = rng.uniform(0, math.pi)
    directions = [angle] if kind == 1 else [angle, angle + math.pi / 2]
    count = 1 if kind == 3 else int(rng.integers(2, 6))
    c, half = _HI / 2, _HI * rng.uniform(0.25, 0.45)
    for a in directions:
        dx, dy = math.cos(a), math.sin(a)
        for k in range(count):
            off = (k - (count - 1) / 2) * half * 2 / max(count, 2)
            cx, cy = c - dy * off, c + dx * off
            draw.line([(cx - dx * half, cy - dy * half), (cx + dx * half, cy + dy * half)], fill=ink, width=width)


def _pattern(rng) -> np.ndarray:
    """A texture in [0, 1] over the canvas: stripes, checks, dots, smooth noise or a gradient."""
    ys, xs = np.mgrid[0:_HI, 0:_HI] / _HI
    angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
    u, v = xs * math.cos(angle) + ys * math.sin(angle), -xs * math.sin(angle) + ys * math.cos(angle)
    kind = int(rng.integers(5))
    if kind == 0:
        return (np.sin(2 * math.pi * freq * u) > 0).astype(np.float32)
    if kind == 1:
        return ((np.floor(freq * u) + np.floor(freq * v)) % 2).astype(np.float32)
    if kind == 2:
        return (np.hypot((freq * u) % 1 - 0.5, (freq * v) % 1 - 0.5) < rng.uniform(0.15, 0.4)).astype(np.float32)
    if kind == 3:
        coarse = rng.uniform(0, 1, size=(int(rng.integers(3, 9)),) * 2).astype(np.float32)
        return np.asarray(Image.fromarray(coarse).resize((_HI, _HI), Image.Resampling.BICUBIC)).clip(0, 1)
    return (u - u.min()) / (u.max() - u.min())


def _texture(rng, canvas: Image.Image) -> None:
    """A textured patch: a rectangle, ellipse or blob filled with a pattern."""
    mask = Image.new("L", (_HI, _HI), 0)
    (_blob, _ellipse, _polygon)[int(rng.integers(3))](rng, mask)
    region = np.asarray(mask, dtype=np.float32) > 0
    values = (0.35 + 0.65 * _pattern(rng)) * _ink(rng) * region
    canvas.paste(Image.fromarray(values.astype(np.uint8)))


def _blob(rng, canvas: Image.Image) -> None:
    """A filled silhouette: a closed curve with a random smooth radius (a few Fourier terms)."""
    draw = ImageDraw.Draw(canvas)
    angles = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    radius = np.ones_like(angles)
    for k in range(1, 6):
        radius += rng.uniform(0, 0.35) / k * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
    sx, sy = rng.uniform(0.6, 1.0, 2)
    r = _HI * 0.3 * radius / radius.max() * 1.3
    points = [
        (_HI / 2 + sx * rr * math.cos(a), _HI / 2 + sy * rr * math.sin(a)) for a, rr in zip(angles, r, strict=True)
    ]
    draw.polygon(points, fill=_ink(rng))


def _text(rng, canvas: Image.Image, char: str, font_path: str) -> None:
    draw = ImageDraw.Draw(canvas)
    font = _font(font_path, 72)
    stroke = int(rng.integers(0, 4))
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    x, y = (_HI - (right - left)) / 2 - left, (_HI - (bottom - top)) / 2 - top
    ink = _ink(rng)
    draw.text((x, y), char, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)


def _latin_letter(rng, canvas: Image.Image) -> None:
    font = PRINTED_DIGITS_FONTS[int(rng.integers(len(PRINTED_DIGITS_FONTS)))]
    letters = _latin_letters(font)
    _text(rng, canvas, letters[int(rng.integers(len(letters)))], font)


def _glyph(rng, canvas: Image.Image) -> None:
    font, chars = _glyph_table()[int(rng.integers(len(_glyph_table())))]
    _text(rng, canvas, chars[int(rng.integers(len(chars)))], font)


_PARTS = (_ellipse, _polygon, _star, _stroke, _lines, _blob, _latin_letter, _glyph)


def _composition(rng, canvas: Image.Image) -> None:
    """Two or three of the other kinds, each shrunk and moved, overlaid."""
    overlay = np.zeros((_HI, _HI), dtype=np.float32)
    for _ in range(int(rng.integers(2, 4))):
        part = Image.new("L", (_HI, _HI), 0)
        _PARTS[int(rng.integers(len(_PARTS)))](rng, part)
        scale = rng.uniform(0.4, 0.7)
        side = max(1, round(_HI * scale))
        small = np.asarray(part.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32)
        y, x = (int(v) for v in rng.integers(0, _HI - side + 1, 2))
        overlay[y : y + side, x : x + side] = np.maximum(overlay[y : y + side, x : x + side], small)
    canvas.paste(Image.fromarray(overlay.clip(0, 255).astype(np.uint8)))


_DRAW = dict(
    zip(
        PROCEDURAL_CLASSES,
        (_ellipse, _polygon, _star, _stroke, _lines, _texture, _blob, _latin_letter, _glyph, _composition),
        strict=True,
    )
)


def render_procedural(kind: int, *, rng: np.random.Generator, image_size: int = 28) -> Image.Image:
    """One procedurally drawn image of class ``kind`` (an index into ``PROCEDURAL_CLASSES``), mode "L",
    ``image_size`` square: drawn at 112 px, a random affine transform, MNIST's framing (the longer side 12..26 px
    of 28), blur and noise."""
    if not 0 <= int(kind) < len(PROCEDURAL_CLASSES):
        raise ValueError(f"kind must be in 0..{len(PROCEDURAL_CLASSES) - 1}, got {kind}")
    canvas = Image.new("L", (_HI, _HI), 0)
    _DRAW[PROCEDURAL_CLASSES[int(kind)]](rng, canvas)
    if rng.random() < 0.7:
        canvas = _random_affine(canvas, rng)
    image = centre_in_frame(canvas, rng=rng, image_size=image_size, box=(12.0, 26.0))
    return blur_and_noise(image, rng=rng, image_size=image_size)


def make_procedural_images(
    num_images: int, *, seed: int = 0, image_size: int = 28, num_proc: int | None = None
) -> datasets.Dataset:
    """Draws ``num_images`` procedural images as a ``datasets.Dataset`` with columns ``image`` and ``label``
    (a ``ClassLabel`` named by ``PROCEDURAL_CLASSES``). Image ``i`` has class ``i % 10`` and is a pure function of
    ``(seed, i)``; ``num_proc`` draws in that many processes (the same images)."""
    return generate_image_set(
        num_images,
        render=functools.partial(_render_indexed, seed=seed, image_size=image_size),
        class_names=PROCEDURAL_CLASSES,
        desc="Drawing procedural images",
        num_proc=num_proc,
    )


def _render_indexed(index: int, class_id: int, *, seed: int, image_size: int) -> Image.Image:
    return render_procedural(class_id, rng=np.random.default_rng([int(seed), int(index), 1]), image_size=image_size)
