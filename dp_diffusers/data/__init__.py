"""Image data: the embedded private digits, the generated public digit sets, and loaders for any image set."""

from .drawn_digits import make_drawn_digits, render_drawn_digit
from .images import ImageLabelDataset, as_torch_dataset, image_transform
from .loading import LoadedDataset, load_image_dataset, parse_class_names
from .printed_digits import PRINTED_DIGITS_FONTS, make_printed_digits, render_digit
from .sklearn_digits import load_sklearn_digits
from .sources import PRESETS, DatasetPreset

__all__ = [
    "PRESETS",
    "PRINTED_DIGITS_FONTS",
    "DatasetPreset",
    "ImageLabelDataset",
    "LoadedDataset",
    "as_torch_dataset",
    "image_transform",
    "load_image_dataset",
    "load_sklearn_digits",
    "make_drawn_digits",
    "make_printed_digits",
    "parse_class_names",
    "render_digit",
    "render_drawn_digit",
]
