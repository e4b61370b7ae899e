"""dp-diffusers: differentially private latent diffusion models (DP-LDM) for the Hugging Face ecosystem."""

from pathlib import Path

from .errors import UserInputError
from .models import ClassEmbedder
from .pipelines import DPLDMPipeline

__version__ = "0.1.0"

#: Folder of the shipped public checkpoint (pre-trained on printed digits only); ``DPLDMPipeline.from_pretrained``
#: accepts it.
DEFAULT_PUBLIC_MODEL = str(Path(__file__).parent / "assets" / "public-printed-digits")

__all__ = ["ClassEmbedder", "DPLDMPipeline", "DEFAULT_PUBLIC_MODEL", "UserInputError", "__version__"]
