"""Model families: ours (class-conditional LDM) built only from diffusers parts, plus the conditioning embedder."""

from .class_embedder import ClassEmbedder
from .configs import build_class_conditional_ldm

__all__ = ["ClassEmbedder", "build_class_conditional_ldm"]
