"""dp-diffusers: differentially private latent diffusion models (DP-LDM) for the Hugging Face ecosystem."""

from pathlib import Path

from .errors import UserInputError
from .models import ClassEmbedder
from .pipelines import DPLDMPipeline

__version__ = "0.1.0"

#: Folder of the shipped public digit checkpoint, pre-trained only on digits drawn by code (pen strokes and printed
#: glyphs from matplotlib's fonts, elastically distorted; ``dp_diffusers.data.drawn_digits``; 60,000 of them, 24,000
#: diffusion steps of a [48, 96] denoiser); ``DPLDMPipeline.from_pretrained`` accepts it.
DEFAULT_PUBLIC_MODEL = str(Path(__file__).parent / "assets" / "public-drawn-digits-wide")
#: Folder of the shipped domain-general public checkpoint: pre-trained only on images drawn by code (shapes, pen
#: strokes, textures, silhouettes, glyphs of many scripts; no digits, ``dp_diffusers.data.procedural``). The start
#: for private images that do not look like digits.
GENERAL_PUBLIC_MODEL = str(Path(__file__).parent / "assets" / "public-procedural")

__all__ = [
    "ClassEmbedder",
    "DPLDMPipeline",
    "DEFAULT_PUBLIC_MODEL",
    "GENERAL_PUBLIC_MODEL",
    "UserInputError",
    "__version__",
]
