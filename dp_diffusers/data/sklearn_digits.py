"""scikit-learn's bundled handwritten digits as an image data set: the embedded default PRIVATE data.

``sklearn.datasets.load_digits`` ships with scikit-learn (no download): 1,797 handwritten digits from 43 writers
(UCI "Optical Recognition of Handwritten Digits"), each an 8x8 image of counts 0..16. Treat them as private: they
are stand-ins for the sensitive data that DP fine-tuning protects, and the default when no data set is named.
"""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image

_CLASS_NAMES = [str(d) for d in range(10)]


def load_sklearn_digits(*, image_size: int = 28, digit_size: int | None = None) -> datasets.Dataset:
    """The 1,797 scikit-learn digits, upsampled (bicubic) to mode-"L" ``image_size`` squares, white on black.

    Columns: ``image`` (``datasets.Image``) and ``label`` (``ClassLabel`` named "0".."9"). The 8x8 counts 0..16
    are rescaled to 0..255 before upsampling. By default the digit is framed as MNIST's are (a 20x20 box centred
    in 28x28, i.e. ``digit_size = round(image_size * 20 / 28)``) so that it matches the public printed digits;
    ``digit_size=image_size`` makes it fill the frame.
    """
    from sklearn.datasets import load_digits

    digit_size = round(image_size * 20 / 28) if digit_size is None else digit_size
    if not 8 <= digit_size <= image_size:
        raise ValueError(f"need 8 <= digit_size <= image_size, got digit_size={digit_size}, image_size={image_size}")
    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    offset = (image_size - digit_size) // 2
    images = []
    for p in pixels:
        digit = Image.fromarray(p).resize((digit_size, digit_size), Image.Resampling.BICUBIC)
        if digit_size != image_size:
            canvas = Image.new("L", (image_size, image_size), 0)
            canvas.paste(digit, (offset, offset))
            digit = canvas
        images.append(digit)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=_CLASS_NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": bunch.target.astype(int).tolist()}, features=features)
