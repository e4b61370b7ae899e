"""The domain-general public pre-training set: drawn by code, deterministic, labelled by kind, and digit-free."""

from __future__ import annotations

import unicodedata

import datasets
import numpy as np
import pytest

from dp_diffusers.data import load_image_dataset
from dp_diffusers.data.printed_digits import PRINTED_DIGITS_FONTS
from dp_diffusers.data.procedural import (
    PROCEDURAL_CLASSES,
    _glyph_table,
    _latin_letters,
    is_digit_like,
    make_procedural_images,
    render_procedural,
)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32).ravel() / 255.0 for im in images])


def test_every_kind_renders_mnist_framed_ink_on_black():
    for kind in range(len(PROCEDURAL_CLASSES)):
        for i in range(5):
            image = render_procedural(kind, rng=np.random.default_rng([7, kind, i]))
            pixels = np.asarray(image, dtype=np.float32)
            assert image.mode == "L" and image.size == (28, 28)
            assert pixels.max() > 100, (PROCEDURAL_CLASSES[kind], i)  # ink ...
            assert np.median(pixels[:, :2]) < 30 and np.median(pixels[:, -2:]) < 30  # ... on a dark margin
    assert render_procedural(0, rng=np.random.default_rng(0), image_size=32).size == (32, 32)
    with pytest.raises(ValueError):
        render_procedural(len(PROCEDURAL_CLASSES), rng=np.random.default_rng(0))


def test_procedural_images_deterministic_balanced_and_labelled():
    a, b = make_procedural_images(30, seed=0), make_procedural_images(30, seed=0)
    other, prefix = make_procedural_images(30, seed=1), make_procedural_images(12, seed=0)
    data = [np.asarray(im) for im in a["image"]]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data, b["image"], strict=True))
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data[:12], prefix["image"], strict=True))
    assert sum(np.array_equal(x, np.asarray(y)) for x, y in zip(data, other["image"], strict=True)) == 0
    assert isinstance(a.features["label"], datasets.ClassLabel)
    assert a.features["label"].names == list(PROCEDURAL_CLASSES)
    assert np.bincount(a["label"], minlength=10).tolist() == [3] * 10


def test_the_kinds_are_distinguishable():
    """Labels carry the kind of image: a classifier trained on one seed's images scores well above chance on
    another seed's."""
    from sklearn.svm import SVC

    train, test = make_procedural_images(1500, seed=0), make_procedural_images(500, seed=1)
    svm = SVC(C=10.0).fit(_pixels(train["image"]), np.asarray(train["label"]))
    # Pixel SVM, 1,500 images: 0.33 measured; chance is 0.10 (ellipses, polygons and blobs overlap in pixels).
    assert svm.score(_pixels(test["image"]), np.asarray(test["label"])) > 0.25


def test_no_digit_code_point_or_digit_shaped_glyph():
    for char in "7٣३③⑦Ⅷ½²":
        assert is_digit_like(char), char
    table = _glyph_table()
    assert len(table) >= 3 and sum(len(chars) for _, chars in table) > 10000  # many scripts and symbols
    for _, chars in table:
        for char in chars:
            assert not unicodedata.category(char).startswith("N") and unicodedata.numeric(char, None) is None
            assert "DIGIT" not in unicodedata.name(char, "")
        # Letters that are drawn like digits are left out, in every script.
        assert not set(chars) & set("ΟΘθВвОоЗзБбՕօ")
    for font in PRINTED_DIGITS_FONTS:
        letters = set(_latin_letters(font))
        assert len(letters) >= 25 and not letters & set("OoIlZSBgq")
    # Shapes that do not look like digits are kept.
    assert {"K", "x", "M"} <= set(_latin_letters(PRINTED_DIGITS_FONTS[0]))


def test_procedural_preset_loads_as_public_class_conditional_data():
    loaded = load_image_dataset("procedural", num_generated_images=20, seed=2)
    assert loaded.id2label == dict(enumerate(PROCEDURAL_CLASSES))
    assert len(loaded.dataset) == 20 and "digit-free" in loaded.source


def test_the_general_prior_is_shipped_digit_free_and_small():
    import json
    from pathlib import Path

    import torch

    from dp_diffusers import DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL, DPLDMPipeline
    from dp_diffusers.families import check_base_model, known_base

    info = json.loads((Path(GENERAL_PUBLIC_MODEL) / "pretraining.json").read_text())
    assert info["public_data"].startswith("procedural shapes") and "--dataset_name procedural" in info["command"]
    assert known_base(GENERAL_PUBLIC_MODEL).data_keys == frozenset({"procedural"})  # never saw any digits
    for private in ("digits", "mnist", "fashion_mnist"):
        check_base_model(GENERAL_PUBLIC_MODEL, private)  # not refused
    # Both shipped priors together stay within the 20 MB (MB = 10**6 bytes) of weights.
    weights = [p for root in (DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL) for p in Path(root).rglob("*.safetensors")]
    assert len(weights) == 6 and sum(p.stat().st_size for p in weights) <= 20 * 10**6
    pipe = DPLDMPipeline.from_pretrained(GENERAL_PUBLIC_MODEL)
    assert list(pipe.id2label.values()) == list(PROCEDURAL_CLASSES)
    images = pipe(class_labels=[0, "stroke"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in images.images] == [(28, 28), (28, 28)]


def test_the_general_prior_carries_its_measured_fine_tuning_recommendation():
    """The far prior's defaults (chosen on the MNIST proxy) are in its own pretraining.json and on its card."""
    from pathlib import Path

    from dp_diffusers import DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL
    from dp_diffusers.families import fine_tune_defaults
    from dp_diffusers.families.presets import FAR_PRIOR_FINE_TUNE, PAPER_FINE_TUNE

    assert fine_tune_defaults(GENERAL_PUBLIC_MODEL) == FAR_PRIOR_FINE_TUNE
    assert fine_tune_defaults(DEFAULT_PUBLIC_MODEL) == PAPER_FINE_TUNE
    card = (Path(GENERAL_PUBLIC_MODEL) / "README.md").read_text()
    assert "(`--trainable_scope attention_up_resnets`)" in card and "learning rate 0.003" in card
