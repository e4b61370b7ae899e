"""Model families for private fine-tuning. A family knows its diffusers model and its diffusion loss, and nothing
of Opacus: it exposes the modules to select trainable parameters from, a per-example loss ``nn.Module`` and a way
to build the pipeline that is saved. ``train_dp_ldm.py`` wires a family to the privacy engine."""

from .class_conditional import ClassConditionalLDM, ClassConditionalLoss

__all__ = ["ClassConditionalLDM", "ClassConditionalLoss"]
