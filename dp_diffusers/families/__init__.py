"""Model families for private fine-tuning. A family knows its diffusers pipeline and its per-example diffusion loss,
and nothing of Opacus: it exposes the modules to select trainable parameters from, a per-example loss ``nn.Module``
and the pipeline that is saved. ``train_dp_ldm.py`` wires a family to the privacy engine."""

from __future__ import annotations

import json
import os

from ..errors import UserInputError
from .base import DEFAULT_PROMPT_TEMPLATE, FamilyOptions, ModelFamily, parse_label_map
from .class_conditional import ClassConditionalLDM, ClassConditionalLoss
from .dit import DiTFamily, DiTLoss
from .presets import (
    KNOWN_BASES,
    RECOMMENDED_BASES,
    check_base_model,
    known_base,
    recommended_base,
    resolve_base_model,
)
from .text_conditional import TextConditionalLDM, TextConditionalLoss
from .unconditional import UnconditionalLDM, UnconditionalLoss

#: Supported families, tried in order against the base model's ``model_index.json`` ``_class_name``.
FAMILIES: list[type[ModelFamily]] = [ClassConditionalLDM, TextConditionalLDM, DiTFamily, UnconditionalLDM]


def read_model_index(name_or_path: str) -> dict:
    """The pipeline's ``model_index.json``, from a local folder or the Hub (through huggingface_hub's cache)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(path):
            raise UserInputError(
                f"No pipeline at {name_or_path!r} (model_index.json missing): pass a diffusers pipeline folder to "
                "--pretrained_model_name_or_path."
            )
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserInputError(
            f"No pipeline at {name_or_path!r} (model_index.json missing): check --pretrained_model_name_or_path."
        )
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name_or_path, "model_index.json")
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserInputError(f"Could not fetch {name_or_path!r}/model_index.json from the Hub: {first}") from e
    with open(path) as f:
        return json.load(f)


def family_for(name_or_path: str) -> type[ModelFamily]:
    """The family of a base pipeline, detected from its own ``model_index.json``."""
    class_name = read_model_index(name_or_path).get("_class_name")
    for family in FAMILIES:
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.pipeline_class_names)})" for f in FAMILIES)
    raise UserInputError(f"{name_or_path!r} is a {class_name}, which is not supported; supported: {supported}.")


def load_family(name_or_path: str, **kwargs) -> ModelFamily:
    return family_for(name_or_path).from_pretrained(name_or_path, **kwargs)


__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "FAMILIES",
    "KNOWN_BASES",
    "RECOMMENDED_BASES",
    "ClassConditionalLDM",
    "ClassConditionalLoss",
    "DiTFamily",
    "DiTLoss",
    "FamilyOptions",
    "ModelFamily",
    "TextConditionalLDM",
    "TextConditionalLoss",
    "UnconditionalLDM",
    "UnconditionalLoss",
    "check_base_model",
    "family_for",
    "known_base",
    "load_family",
    "parse_label_map",
    "recommended_base",
    "resolve_base_model",
]
