"""Honest public bases: which public model to start from for a private data set, and which never to use.

DP fine-tuning protects the private images only if the public base model never saw them. A base pre-trained on
the same data (``CompVis/ldm-celebahq-256`` for CelebA, ``google/ddpm-cifar10-32`` for CIFAR-10) may already
memorise private images, and no privacy guarantee covers its weights: such a pair is refused. ``KNOWN_BASES``
records the pre-training data of well-known Hub models (shown on the privacy card); ``RECOMMENDED_BASES`` gives, per
data preset, a base that never saw that data, with the conditioning to use; ``fine_tune_defaults`` what trains,
and how fast, when a run starts from a base and the user does not say.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from .. import DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL
from ..data import PRESETS
from ..errors import UserInputError
from ..trainable import SCOPES


@dataclass(frozen=True)
class KnownBase:
    """A public model and the data it was pre-trained on (``data_keys``: canonical names of those data sets)."""

    pretraining_data: str
    data_keys: frozenset[str]


_IMAGENET = KnownBase("ImageNet-1k (ILSVRC-2012 train, 1.28M images, 1,000 classes)", frozenset({"imagenet"}))
# CelebA-HQ is 30,000 CelebA images re-processed at higher resolution: a CelebA-HQ model saw CelebA images.
_CELEBA_HQ = KnownBase(
    "CelebA-HQ (30,000 faces selected from CelebA and re-processed)", frozenset({"celeba", "celeba_hq"})
)
_LAION_SD1 = KnownBase(
    "LAION-2B-en, then LAION-Aesthetics v2 5+ (web-scale scrapes; may contain images of any public web data set)",
    frozenset({"laion"}),
)
_LAION_SD2 = KnownBase(
    "a filtered subset of LAION-5B (web-scale scrapes; may contain images of any public web data set)",
    frozenset({"laion"}),
)

#: Pre-training data of well-known public diffusers models, by lower-case Hub id.
KNOWN_BASES: dict[str, KnownBase] = {
    "facebook/dit-xl-2-256": _IMAGENET,
    "facebook/dit-xl-2-512": _IMAGENET,
    "compvis/ldm-celebahq-256": _CELEBA_HQ,
    "google/ddpm-celebahq-256": _CELEBA_HQ,
    "google/ddpm-ema-celebahq-256": _CELEBA_HQ,
    "google/ddpm-cifar10-32": KnownBase("CIFAR-10 (train, 50,000 images)", frozenset({"cifar10"})),
    "google/ddpm-church-256": KnownBase("LSUN church outdoor", frozenset({"lsun_church"})),
    "google/ddpm-bedroom-256": KnownBase("LSUN bedroom", frozenset({"lsun_bedroom"})),
    "google/ddpm-cat-256": KnownBase("LSUN cat", frozenset({"lsun_cat"})),
    "compvis/ldm-text2im-large-256": KnownBase("LAION-400M (web-scale scrapes)", frozenset({"laion"})),
    "compvis/stable-diffusion-v1-4": _LAION_SD1,
    "runwayml/stable-diffusion-v1-5": _LAION_SD1,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _LAION_SD1,
    "stabilityai/stable-diffusion-2-base": _LAION_SD2,
    "stabilityai/stable-diffusion-2-1-base": _LAION_SD2,
}

#: The shipped public digit model (pre-trained only on digits drawn by code: pen strokes and printed glyphs).
SHIPPED_BASE = KnownBase(
    "drawn digits: pen strokes drawn by code and printed digits rendered from matplotlib's fonts, elastically "
    "distorted (generated, public)",
    frozenset({"drawn_digits", "printed_digits"}),
)

# ImageNet-1k ids for the CIFAR-10 classes (airplane .. truck): airliner, beach wagon, robin, tabby cat, impala
# (ImageNet-1k has no deer), golden retriever, tree frog, sorrel (horse), container ship, trailer truck.
CIFAR10_TO_IMAGENET = "0:404,1:436,2:15,3:281,4:352,5:207,6:31,7:339,8:510,9:867"


@dataclass(frozen=True)
class PublicBase:
    """The recommended public base of a data preset: ``model`` never saw the preset's data."""

    model: str
    conditioning: str
    reason: str
    label_map: str | None = None


RECOMMENDED_BASES: dict[str, PublicBase] = {
    **{
        name: PublicBase(
            model=DEFAULT_PUBLIC_MODEL,
            conditioning="class-conditional: the 10 classes, one class embedder row each",
            reason="the shipped model was pre-trained only on digits drawn by code (pen strokes and printed glyphs), "
            f"never on {name}; it is a small 28x28 grayscale class-conditional LDM, as in the paper's MNIST setting",
        )
        for name in ("digits", "mnist")
    },
    "fashion_mnist": PublicBase(
        model=GENERAL_PUBLIC_MODEL,
        conditioning="class-conditional: the 10 classes, one class embedder row each",
        reason="clothing is far from digits: the shipped domain-general model was pre-trained only on images drawn "
        "by code (shapes, strokes, textures, silhouettes, glyphs; no digits), never on fashion_mnist",
    ),
    "cifar10": PublicBase(
        model="facebook/DiT-XL-2-256",
        conditioning="class-conditional: the 10 CIFAR-10 classes mapped onto related ImageNet classes "
        f"(--label_map={CIFAR10_TO_IMAGENET})",
        reason="pre-trained on ImageNet-1k only, as the paper's CIFAR-10 setting (ImageNet32 -> CIFAR-10); never "
        "google/ddpm-cifar10-32 (trained on CIFAR-10)",
        label_map=CIFAR10_TO_IMAGENET,
    ),
    "celeba": PublicBase(
        model="facebook/DiT-XL-2-256",
        conditioning="class-conditional on the CelebA attribute 'Male' (2 new label rows, initialised from the "
        "mean ImageNet class embedding); --label_column picks another attribute",
        reason="pre-trained on ImageNet-1k only, as the paper's CelebA setting (ImageNet -> CelebA); never "
        "CompVis/ldm-celebahq-256 (CelebA-HQ is made of CelebA images)",
    ),
}

# Canonical data-set keys of the private data, by preset name or Hub id (lower case).
_DATA_KEYS: dict[str, str] = {
    "digits": "sklearn_digits",
    **{p.name: p.name for p in PRESETS.values() if p.name != "digits"},
    **{p.hub_id.lower(): p.name for p in PRESETS.values() if p.hub_id},
    "celeba_hq": "celeba",  # a subset of CelebA
    "celeba-hq": "celeba",
    "imagenet": "imagenet",
    "imagenet-1k": "imagenet",
    "ilsvrc/imagenet-1k": "imagenet",
}


def private_data_key(dataset_name: str | None) -> str | None:
    """The canonical name of a private data set given as a preset or Hub id (None for local data)."""
    if not dataset_name:
        return "sklearn_digits"
    return _DATA_KEYS.get(dataset_name.strip().lower())


def _same_path(a: str, b: str) -> bool:
    if os.path.realpath(os.path.expanduser(a)) == os.path.realpath(b):
        return True
    try:
        return os.path.isdir(a) and os.path.samefile(a, b)
    except OSError:
        return False


def pretraining_info(name_or_path: str) -> dict | None:
    """A base's ``pretraining.json`` (written by ``examples/pretrain_public_ldm.py``): from a local folder, or from
    the local Hub cache for a Hub id (never from the network). None where there is none, or it is not a JSON object."""
    name = str(name_or_path)
    info = Path(name) / "pretraining.json"
    if not info.is_file():
        try:  # a Hub id downloaded earlier; an invalid id or a missing file is simply "none"
            cached = try_to_load_from_cache(name.strip().rstrip("/"), "pretraining.json")
        except (ValueError, OSError):
            return None
        if not isinstance(cached, str):
            return None
        info = Path(cached)
    try:
        found = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def known_base(name_or_path: str) -> KnownBase | None:
    """What a base model was pre-trained on: the table for Hub ids, the shipped model, or the base's
    ``pretraining.json`` (see ``pretraining_info``)."""
    name = str(name_or_path)
    if _same_path(name, DEFAULT_PUBLIC_MODEL):
        return SHIPPED_BASE
    found = KNOWN_BASES.get(name.strip().rstrip("/").lower())
    if found is not None:
        return found
    public = (pretraining_info(name) or {}).get("public_data")
    if public:
        keys = {key for alias, key in _DATA_KEYS.items() if _mentions(str(public), alias)}
        for words in ("printed digits", "drawn digits"):
            if words in str(public).lower():
                keys.add(words.replace(" ", "_"))
        return KnownBase(str(public), frozenset(keys))
    return None


def _mentions(text: str, alias: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(alias)}(?![\w-])", text, flags=re.IGNORECASE) is not None


def base_pretraining_data(name_or_path: str) -> str | None:
    found = known_base(name_or_path)
    return found.pretraining_data if found is not None else None


def recommended_base(dataset_name: str | None) -> PublicBase | None:
    """The recommended base of a data preset (None for data sets that are not presets)."""
    name = (dataset_name or "digits").strip()
    if name in SHIPPED_BASE.data_keys:
        raise UserInputError(
            f"{name} is the public pre-training data of the shipped model, not private data: pass "
            "`pretrained_model_name_or_path` with a base that never saw it."
        )
    return RECOMMENDED_BASES.get(name)


@dataclass(frozen=True)
class FineTuneDefaults:
    """What trains and how fast when a run starts from a base and the user does not say (``--trainable_scope``,
    ``--learning_rate``). ``trainable_scope`` None: the paper's choice (the attention blocks, or what the family
    trains by default)."""

    trainable_scope: str | None
    learning_rate: float


#: The paper's settings: a base whose ``pretraining.json`` recommends nothing starts here.
PAPER_FINE_TUNE = FineTuneDefaults(
    trainable_scope=None,
    learning_rate=1e-3,
)

#: From the domain-general prior (it never saw the user's kind of image) the denoiser must move further, so more of it
#: trains, faster. Chosen on the MNIST proxy (benchmarks/mnist/README.md, epsilon 10, 5 epochs, 10,000 samples): the
#: attention blocks at 1e-3 scored 53.76, the whole denoiser at 1e-3 55.46, attention + up-path ResNets at 3e-3 79.47
#: (92.12 after 20 epochs). The shipped prior's ``pretraining.json`` carries it (``fine_tune_defaults``), so a copy of
#: the prior, local or on the Hub, keeps it.
FAR_PRIOR_FINE_TUNE = FineTuneDefaults(
    trainable_scope="attention_up_resnets",
    learning_rate=3e-3,
)


def fine_tune_defaults(base: str) -> FineTuneDefaults:
    """The defaults for a run that starts from ``base`` (a Hub id or a folder): what the base's ``pretraining.json``
    recommends (``"fine_tune_defaults": {"trainable_scope": ..., "learning_rate": ...}``, written by
    ``examples/pretrain_public_ldm.py --fine_tune_trainable_scope/--fine_tune_learning_rate``), else the paper's."""
    recommended = (pretraining_info(base) or {}).get("fine_tune_defaults")
    if recommended is None:
        return PAPER_FINE_TUNE
    scope = recommended.get("trainable_scope") if isinstance(recommended, dict) else None
    rate = recommended.get("learning_rate", PAPER_FINE_TUNE.learning_rate) if isinstance(recommended, dict) else None
    valid_rate = isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < float("inf")
    if not valid_rate or (scope is not None and scope not in SCOPES):
        raise UserInputError(
            f'{base}: pretraining.json\'s fine_tune_defaults must be {{"trainable_scope": one of {", ".join(SCOPES)} '
            f'or null, "learning_rate": a positive number}}, got {recommended!r}: fix the file, or pass '
            "`trainable_scope` and `learning_rate` yourself."
        )
    return FineTuneDefaults(trainable_scope=scope, learning_rate=float(rate))


def resolve_base_model(base: str | None, dataset_name: str | None) -> tuple[str, PublicBase | None]:
    """``base`` if given, else the preset's recommended base (the shipped model for non-presets)."""
    if base:
        return base, None
    recommendation = recommended_base(dataset_name)
    if recommendation is None:
        return DEFAULT_PUBLIC_MODEL, None
    return recommendation.model, recommendation


def check_base_model(base: str, dataset_name: str | None) -> None:
    """Refuse a base model known to have been pre-trained on the private data (one-line ``UserInputError``)."""
    key = private_data_key(dataset_name)
    found = known_base(base)
    if key is None or found is None or key not in found.data_keys:
        return
    recommendation = RECOMMENDED_BASES.get(key)
    alternative = f", e.g. {recommendation.model}" if recommendation is not None else ""
    raise UserInputError(
        f"`pretrained_model_name_or_path`={base} was pre-trained on {found.pretraining_data}, which is (or contains) "
        f"the private data {dataset_name}: it may already memorise private images and no DP guarantee covers its "
        f"weights; use a public base that never saw {dataset_name}{alternative}."
    )
