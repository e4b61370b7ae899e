"""Model families for private fine-tuning. A family knows its diffusers pipeline and its per-example diffusion loss,
and nothing of Opacus: it exposes the modules to select trainable parameters from, a per-example loss ``nn.Module``
and the pipeline that is saved. ``train_dp_ldm.py`` wires a family to the privacy engine."""

from __future__ import annotations

import json
import os

from ..errors import UserInputError, first_line, looks_local
from .base import DEFAULT_PROMPT_TEMPLATE, FamilyOptions, ModelFamily, parse_label_map
from .class_conditional import ClassConditionalLDM, ClassConditionalLoss
from .dit import DiTFamily, DiTLoss
from .presets import (
    KNOWN_BASES,
    RECOMMENDED_BASES,
    FineTuneDefaults,
    check_base_model,
    fine_tune_defaults,
    known_base,
    recommended_base,
    resolve_base_model,
)
from .text_conditional import TextConditionalLDM, TextConditionalLoss
from .unconditional import UnconditionalLDM, UnconditionalLoss

#: Supported families, tried in order against the base model's ``model_index.json`` ``_class_name``.
FAMILIES: list[type[ModelFamily]] = [ClassConditionalLDM, TextConditionalLDM, DiTFamily, UnconditionalLDM]


def read_model_index(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None) -> dict:
    """The pipeline's ``model_index.json``, from a local folder or the Hub (through huggingface_hub's cache)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(path):
            raise UserInputError(
                f"No pipeline at {name_or_path!r} (model_index.json missing): pass a diffusers pipeline folder to "
                "`pretrained_model_name_or_path`."
            )
    elif looks_local(name_or_path):
        raise UserInputError(
            f"No pipeline at {name_or_path!r} (model_index.json missing): check `pretrained_model_name_or_path`."
        )
    else:
        from huggingface_hub import constants, hf_hub_download

        try:
            # With HF_HUB_OFFLINE set this reads the local cache only and fails at once when the model is not there.
            path = hf_hub_download(
                name_or_path,
                "model_index.json",
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=constants.HF_HUB_OFFLINE,
            )
        except Exception as e:
            first = first_line(e)
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise UserInputError(
                f"Could not fetch {name_or_path!r}/model_index.json from the Hub{offline}: {first}"
            ) from e
    with open(path) as f:
        return json.load(f)


def family_for(name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None) -> type[ModelFamily]:
    """The family of a base pipeline, detected from its own ``model_index.json``."""
    class_name = read_model_index(name_or_path, revision=revision, cache_dir=cache_dir).get("_class_name")
    for family in FAMILIES:
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.pipeline_class_names)})" for f in FAMILIES)
    raise UserInputError(f"{name_or_path!r} is a {class_name}, which is not supported; supported: {supported}.")


def load_family(
    name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | None = None,
    **kwargs,
) -> ModelFamily:
    """The family of ``name_or_path``, loaded with diffusers' ``from_pretrained`` (``revision``, ``variant`` and
    ``cache_dir`` as there; None: diffusers' defaults)."""
    hub = {
        k: v for k, v in {"revision": revision, "variant": variant, "cache_dir": cache_dir}.items() if v is not None
    }
    family = family_for(name_or_path, revision=revision, cache_dir=cache_dir)
    try:
        return family.from_pretrained(name_or_path, **hub, **kwargs)
    except UserInputError:
        raise
    except Exception as e:  # diffusers/safetensors raise many types; the user needs one line and the fix
        raise UserInputError(
            f"Could not load the {family.pipeline_class.__name__} at {name_or_path!r} ({first_line(e)}): re-save or "
            "re-download it, or check `revision` / `variant`."
        ) from e


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
    "FineTuneDefaults",
    "ModelFamily",
    "TextConditionalLDM",
    "TextConditionalLoss",
    "UnconditionalLDM",
    "UnconditionalLoss",
    "check_base_model",
    "family_for",
    "fine_tune_defaults",
    "known_base",
    "load_family",
    "parse_label_map",
    "recommended_base",
    "resolve_base_model",
]
