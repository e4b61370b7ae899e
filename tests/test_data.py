"""Tests of dp_diffusers.data: printed digits, sklearn digits, presets, loading and tensor conversion (no network)."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dp_diffusers import UserInputError
from dp_diffusers.data import (
    PRESETS,
    PRINTED_DIGITS_FONTS,
    DatasetPreset,
    LoadedDataset,
    as_torch_dataset,
    image_transform,
    load_image_dataset,
    load_sklearn_digits,
    make_drawn_digits,
    make_printed_digits,
    render_digit,
    render_drawn_digit,
)
from dp_diffusers.data.drawn_digits import draw_strokes, elastic_distortion
from dp_diffusers.data.printed_digits import _image_rng
from dp_diffusers.data.procedural import make_procedural_images

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train.parquet").is_file(), reason=f"{MNIST_DIR} is absent")


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """Keeps the Arrow caches `load_dataset` writes for local files out of the user's cache folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32).ravel() / 255.0 for im in images])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- printed digits


def test_printed_digits_fonts_are_bundled_text_fonts():
    names = {Path(f).name for f in PRINTED_DIGITS_FONTS}
    assert len(names) >= 15 and all(Path(f).is_file() for f in PRINTED_DIGITS_FONTS)
    assert "DejaVuSans.ttf" in names and "cmr10.ttf" in names
    for excluded in ("cmex10.ttf", "cmsy10.ttf", "cmmi10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"):
        assert excluded not in names
    assert not any(n.startswith(("STIXSiz", "STIXNonUni")) for n in names)


def test_render_digit_format():
    image = render_digit(7, rng=np.random.default_rng(0))
    assert image.mode == "L" and image.size == (28, 28)
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.max() > 200  # a white digit ...
    assert np.median(pixels) < 20  # ... on black
    assert pixels[:2].mean() < 30 and pixels[-2:].mean() < 30  # MNIST-like margin
    assert render_digit(3, rng=np.random.default_rng(0), image_size=32).size == (32, 32)
    with pytest.raises(ValueError):
        render_digit(10, rng=np.random.default_rng(0))


def test_printed_digits_deterministic():
    a = make_printed_digits(30, seed=0)
    b = make_printed_digits(30, seed=0)
    c = make_printed_digits(30, seed=1)
    prefix = make_printed_digits(12, seed=0)  # per-image RNG: the first images do not depend on the count
    data = [np.asarray(im) for im in a["image"]]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data, b["image"], strict=True))
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data[:12], prefix["image"], strict=True))
    assert not any(np.array_equal(x, np.asarray(y)) for x, y in zip(data, c["image"], strict=True))
    assert a["label"] == b["label"] == c["label"]


def test_printed_digits_dataset_features_and_balance():
    ds = make_printed_digits(50, seed=3)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == [str(d) for d in range(10)]
    assert np.bincount(ds["label"], minlength=10).tolist() == [5] * 10
    assert {im.mode for im in ds["image"]} == {"L"} and {im.size for im in ds["image"]} == {(28, 28)}


@pytest.fixture(scope="module")
def printed_digit_classifier():
    """An RBF SVM trained on 2,000 printed digits (seed 0)."""
    from sklearn.svm import SVC

    labels = np.arange(2000) % 10
    images = [render_digit(int(d), rng=_image_rng(0, i)) for i, d in enumerate(labels)]
    return SVC(C=10.0, gamma="scale").fit(_pixels(images), labels)


def test_printed_digits_labels_are_right(printed_digit_classifier):
    """The labels match the drawn digits: a classifier generalizes to a separately seeded set."""
    test = make_printed_digits(600, seed=1)
    accuracy = printed_digit_classifier.score(_pixels(test["image"]), np.asarray(test["label"]))
    assert accuracy > 0.9


def test_every_font_draws_real_digits(printed_digit_classifier):
    """Each kept font renders recognizable digits (a symbol font would be classified at chance)."""
    labels = np.tile(np.arange(10), 3)
    for font in PRINTED_DIGITS_FONTS:
        images = [render_digit(int(d), rng=_image_rng(7, i), font=font) for i, d in enumerate(labels)]
        accuracy = printed_digit_classifier.score(_pixels(images), labels)
        assert accuracy >= 0.75, f"{Path(font).name}: {accuracy:.2f}"


@pytest.mark.parametrize("make", [make_printed_digits, make_drawn_digits, make_procedural_images])
def test_generated_sets_are_the_same_drawn_in_several_processes(make):
    serial, parallel = make(23, seed=4), make(23, seed=4, num_proc=2)
    assert parallel.features == serial.features and parallel["label"] == serial["label"]
    for a, b in zip(serial["image"], parallel["image"], strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="num_proc"):
        make(3, num_proc=0)


# ---------------------------------------------------------------- drawn digits


def test_drawn_digits_deterministic_balanced_and_mnist_framed():
    a, b = make_drawn_digits(40, seed=0), make_drawn_digits(40, seed=0)
    prefix, other = make_drawn_digits(15, seed=0), make_drawn_digits(40, seed=1)
    data = [np.asarray(im) for im in a["image"]]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data, b["image"], strict=True))
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(data[:15], prefix["image"], strict=True))
    assert not any(np.array_equal(x, np.asarray(y)) for x, y in zip(data, other["image"], strict=True))
    assert a.features["label"].names == [str(d) for d in range(10)]
    assert np.bincount(a["label"], minlength=10).tolist() == [4] * 10
    pixels = np.stack(data).astype(np.float32)
    assert pixels.shape == (40, 28, 28) and (pixels.max(axis=(1, 2)) > 150).all()  # white ink on black
    assert pixels[:, :2].mean() < 30 and pixels[:, -2:].mean() < 30  # MNIST's margin
    ys, xs = np.indices((28, 28))
    com = np.stack([(pixels * ys).sum((1, 2)), (pixels * xs).sum((1, 2))], 1) / pixels.sum((1, 2))[:, None]
    assert np.abs(com - 13.5).max() < 3.5  # centred by mass, as MNIST
    with pytest.raises(ValueError):
        render_drawn_digit(10, rng=np.random.default_rng(0))


def test_elastic_distortion_moves_ink_but_keeps_it():
    image = render_digit(8, rng=np.random.default_rng(0))
    assert np.array_equal(np.asarray(elastic_distortion(image, rng=np.random.default_rng(0), alpha=0.0, sigma=3.0)),
                          np.asarray(image))  # fmt: skip
    moved = np.asarray(elastic_distortion(image, rng=np.random.default_rng(0), alpha=12.0, sigma=3.0), np.float32)
    still = np.asarray(image, np.float32)
    assert np.abs(moved - still).mean() > 1.0  # the strokes moved ...
    assert abs(moved.sum() - still.sum()) / still.sum() < 0.1  # ... and the ink stayed (no tearing, no loss)


def test_every_stroke_template_reads_as_its_digit(printed_digit_classifier):
    """The pen-stroke templates draw the digit they are labelled with: the printed-digit judge reads each digit's
    strokes as that digit (a wrong template reads as another digit, near 0; the open "4", which no font draws,
    halves digit 4's score)."""
    from dp_diffusers.data.printed_digits import centre_in_frame

    frame = np.random.default_rng(0)
    for digit in range(10):
        images = [
            centre_in_frame(
                draw_strokes(digit, rng=np.random.default_rng([3, digit, i])),
                rng=frame,
                image_size=28,
                box=(19.0, 19.0),
            )  # fmt: skip
            for i in range(30)
        ]
        accuracy = printed_digit_classifier.score(_pixels(images), np.full(30, digit))
        assert accuracy >= 0.4, f"{digit}: {accuracy:.2f}"


@needs_mnist
def test_drawn_digits_are_closer_to_handwriting_than_printed_ones():
    """What the set is for: a classifier trained on drawn digits reads real handwriting (MNIST test) better than one
    trained on as many printed digits (measured: 72% against 62%, 3,000 images each, 2,000 MNIST digits)."""
    from sklearn.svm import SVC

    test = pq.read_table(MNIST_DIR / "test.parquet").slice(0, 2000).to_pylist()
    x_real = _pixels([Image.open(io.BytesIO(row["image"]["bytes"])) for row in test])
    y_real = np.asarray([row["label"] for row in test])
    scores = {}
    for name, make in (("printed", make_printed_digits), ("drawn", make_drawn_digits)):
        train = make(3000, seed=11)
        judge = SVC(C=10.0).fit(_pixels(train["image"]), np.asarray(train["label"]))
        scores[name] = judge.score(x_real, y_real)
    assert scores["drawn"] >= scores["printed"] + 0.05, scores


# ---------------------------------------------------------------- sklearn digits


def test_sklearn_digits():
    ds = load_sklearn_digits()
    assert len(ds) == 1797
    assert ds.features["label"].names == [str(d) for d in range(10)]
    assert sorted(set(ds["label"])) == list(range(10))
    first = ds[0]["image"]
    assert first.mode == "L" and first.size == (28, 28)
    assert np.asarray(first).max() > 200  # 0..16 rescaled to 0..255
    framed = np.asarray(load_sklearn_digits(digit_size=20)[0]["image"])
    assert framed.shape == (28, 28) and framed[:4].max() == 0 and framed[:, -4:].max() == 0


# ---------------------------------------------------------------- presets


def test_presets():
    assert {"digits", "printed_digits", "mnist", "fashion_mnist", "cifar10", "celeba"} <= set(PRESETS)
    expected = {
        "mnist": ("ylecun/mnist", "image", "label", 28, 1),
        "fashion_mnist": ("zalando-datasets/fashion_mnist", "image", "label", 28, 1),
        "cifar10": ("uoft-cs/cifar10", "img", "label", 32, 3),
        "celeba": ("flwrlabs/celeba", "image", "Male", 32, 3),
        "digits": (None, "image", "label", 28, 1),
        "printed_digits": (None, "image", "label", 28, 1),
    }
    for name, (hub_id, image_column, label_column, resolution, channels) in expected.items():
        preset = PRESETS[name]
        assert isinstance(preset, DatasetPreset) and preset.name == name and preset.description
        assert (preset.hub_id, preset.image_column, preset.label_column) == (hub_id, image_column, label_column)
        assert (preset.resolution, preset.channels, preset.split) == (resolution, channels, "train")


def test_preset_loads_from_hub_id_with_split(monkeypatch):
    calls = []
    fake = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (32, 32))] * 2, "label": [0, 1]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )

    def fake_load(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    loaded = load_image_dataset("cifar10", split="test")
    assert calls == [("uoft-cs/cifar10", "test")]
    assert (loaded.image_column, loaded.label_column, loaded.id2label) == ("img", "label", {0: "a", 1: "b"})
    assert loaded.preset is PRESETS["cifar10"] and "uoft-cs/cifar10" in loaded.source
    load_image_dataset("someone/some-images")
    assert calls[-1] == ("someone/some-images", "train")
    with pytest.raises(UserInputError, match="`label_column`"):  # 'img' found, but no 'label' column guessed
        load_image_dataset("someone/other", label_column="fine_label")


def test_celeba_boolean_attribute_becomes_class(monkeypatch):
    fake = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (178, 218))] * 3, "Male": [True, False, True], "Smiling": [False, False, True]},
        features=datasets.Features(
            {"image": datasets.Image(), "Male": datasets.Value("bool"), "Smiling": datasets.Value("bool")}
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    loaded = load_image_dataset("celeba")
    assert loaded.id2label == {0: "female", 1: "male"}
    assert loaded.dataset["Male"] == [1, 0, 1]
    smiling = load_image_dataset("celeba", label_column="Smiling")
    assert smiling.id2label == {0: "False", 1: "True"} and smiling.dataset["Smiling"] == [0, 0, 1]


def test_hub_failure_is_a_user_input_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserInputError) as info:
        load_image_dataset("mnist")
    message = str(info.value)
    assert "ylecun/mnist" in message and "ConnectionError" in message and "\n" not in message


# ---------------------------------------------------------------- load_image_dataset


def test_load_embedded_sets():
    digits = load_image_dataset()
    assert len(digits.dataset) == 1797 and digits.preset is PRESETS["digits"] and "digits" in digits.source
    assert digits.id2label == {i: str(i) for i in range(10)}
    assert (digits.image_column, digits.label_column) == ("image", "label")
    printed = load_image_dataset("printed_digits", num_generated_images=20, seed=5)
    assert len(printed.dataset) == 20 and printed.preset is PRESETS["printed_digits"]
    expected = make_printed_digits(1, seed=5)[0]["image"]
    assert np.array_equal(np.asarray(printed.dataset[0]["image"]), np.asarray(expected))
    drawn = load_image_dataset("drawn_digits", num_generated_images=20, seed=5)
    assert len(drawn.dataset) == 20 and drawn.preset is PRESETS["drawn_digits"] and "drawn digits" in drawn.source
    assert np.array_equal(np.asarray(drawn.dataset[3]["image"]), np.asarray(make_drawn_digits(4, seed=5)[3]["image"]))
    with pytest.raises(UserInputError, match="`split`"):
        load_image_dataset("digits", split="test")


def test_unknown_names():
    with pytest.raises(UserInputError, match="mnist") as info:
        load_image_dataset("not_a_dataset")
    assert "printed_digits" in str(info.value) and "celeba" in str(info.value)
    with pytest.raises(UserInputError, match="no such"):
        load_image_dataset("/no/such/folder/anywhere")
    with pytest.raises(UserInputError, match="no such parquet"):
        load_image_dataset("/no/such/file.parquet")


@needs_mnist
def test_load_mnist_folder_and_file():
    train = load_image_dataset(str(MNIST_DIR))
    assert len(train.dataset) == 60000 and train.id2label == {i: str(i) for i in range(10)}
    assert train.dataset[0]["label"] == 5 and train.dataset[0]["image"].mode == "L"
    test = load_image_dataset(str(MNIST_DIR), split="test")
    assert len(test.dataset) == 10000 and test.dataset[0]["label"] == 7
    single = load_image_dataset(str(MNIST_DIR / "test.parquet"))
    assert len(single.dataset) == 10000 and single.label_column == "label"
    with pytest.raises(UserInputError, match="`split`"):
        load_image_dataset(str(MNIST_DIR), split="validation")
    with pytest.raises(UserInputError) as info:
        load_image_dataset(str(MNIST_DIR / "test.parquet"), image_column="img")
    assert "'img'" in str(info.value) and "`image_column`" in str(info.value) and "image, label" in str(info.value)


def _write_plain_parquet(path: Path, n: int, *, offset: int = 0) -> None:
    """Images as {bytes, path} structs and string labels, without the `datasets` metadata."""
    rows = [{"bytes": _png(Image.new("L", (10, 10), color=(i + offset) * 20 % 256)), "path": None} for i in range(n)]
    names = [["cat", "dog", "bird"][(i + offset) % 3] for i in range(n)]
    pq.write_table(pa.table({"picture": rows, "kind": names, "score": [0.5] * n}), path)


def test_load_local_parquet(tmp_path):
    _write_plain_parquet(tmp_path / "a.parquet", 6)
    with pytest.raises(UserInputError, match="declares no label set.*`class_names`"):  # never read from the data
        load_image_dataset(str(tmp_path / "a.parquet"), image_column="picture", label_column="kind")
    loaded = load_image_dataset(
        str(tmp_path / "a.parquet"), image_column="picture", label_column="kind", class_names=["bird", "cat", "dog"]
    )
    assert isinstance(loaded, LoadedDataset) and loaded.preset is None
    assert isinstance(loaded.dataset.features["picture"], datasets.Image)
    assert loaded.id2label == {0: "bird", 1: "cat", 2: "dog"}  # the declared order
    assert loaded.dataset["kind"] == [1, 2, 0, 1, 2, 0]
    assert loaded.label_set_source == "the class names given as input (`class_names`)"
    reordered = load_image_dataset(
        str(tmp_path / "a.parquet"), image_column="picture", label_column="kind", class_names=["dog", "cat", "bird"]
    )
    assert reordered.dataset["kind"] == [1, 0, 2, 1, 0, 2]
    with pytest.raises(UserInputError, match="2 example"):  # two "bird" rows outside the declared set, counted
        load_image_dataset(
            str(tmp_path / "a.parquet"), image_column="picture", label_column="kind", class_names=["cat", "dog"]
        )
    assert loaded.dataset[0]["picture"].size == (10, 10)

    _write_plain_parquet(tmp_path / "b.parquet", 3, offset=1)
    both = load_image_dataset(f"{tmp_path / 'a.parquet'},{tmp_path / 'b.parquet'}", image_column="picture")
    assert len(both.dataset) == 9 and both.label_column is None and both.id2label == {}

    with pytest.raises(UserInputError) as info:
        load_image_dataset(str(tmp_path / "a.parquet"), image_column="picture", label_column="label")
    assert "'label'" in str(info.value) and "`label_column`" in str(info.value)
    with pytest.raises(UserInputError, match="`image_column`"):  # no image-like column to guess
        load_image_dataset(str(tmp_path / "a.parquet"))
    with pytest.raises(UserInputError, match="not class labels"):
        load_image_dataset(
            str(tmp_path / "a.parquet"), image_column="picture", label_column="score", class_names=["a"]
        )


def test_load_parquet_folder_with_splits(tmp_path):
    root = tmp_path / "data"
    (root / "data").mkdir(parents=True)
    _write_plain_parquet(root / "data" / "train-00000-of-00002.parquet", 4)
    _write_plain_parquet(root / "data" / "train-00001-of-00002.parquet", 4)
    _write_plain_parquet(root / "data" / "test-00000-of-00001.parquet", 3)
    names = ["bird", "cat", "dog"]
    train = load_image_dataset(str(root), image_column="picture", label_column="kind", class_names=names)
    test = load_image_dataset(str(root), split="test", image_column="picture", label_column="kind", class_names=names)
    assert (len(train.dataset), len(test.dataset)) == (8, 3)


def test_load_imagefolder(tmp_path):
    for label, colors in {"cat": [(255, 0, 0), (0, 255, 0)], "dog": [(0, 0, 255)]}.items():
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i, color in enumerate(colors):
            Image.new("RGB", (12, 8), color).save(tmp_path / "pets" / label / f"{i}.png")
    loaded = load_image_dataset(str(tmp_path / "pets"))
    assert len(loaded.dataset) == 3 and loaded.image_column == "image" and loaded.label_column == "label"
    assert loaded.id2label == {0: "cat", 1: "dog"}
    items = as_torch_dataset(loaded, resolution=8, channels=3)
    assert sorted(int(items[i]["labels"]) for i in range(3)) == [0, 0, 1]
    assert items[0]["pixel_values"].shape == (3, 8, 8)


# ---------------------------------------------------------------- tensors


def test_image_transform_gray_and_rgb():
    gray = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    to_l = image_transform(resolution=2, channels=1)
    x = to_l(gray)
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2)
    assert torch.equal(x, torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]]))

    to_rgb = image_transform(resolution=16, channels=3)
    y = to_rgb(gray)
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])

    red = Image.new("RGB", (40, 30), (255, 0, 0))
    z = image_transform(resolution=28, channels=1)(red)
    assert z.shape == (1, 28, 28) and torch.allclose(z, torch.full_like(z, 76 / 127.5 - 1))  # L = 0.299 R

    clear = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # transparent -> black
    assert torch.equal(to_l(clear), torch.full((1, 2, 2), -1.0))
    palette = Image.new("P", (5, 5), 0)
    assert to_rgb(palette).shape == (3, 16, 16)
    with pytest.raises(UserInputError):
        image_transform(resolution=28, channels=2)


def test_image_transform_center_crops():
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255  # only the middle third is white
    out = image_transform(resolution=10, channels=1)(Image.fromarray(wide))
    assert out.shape == (1, 10, 10) and torch.equal(out, torch.ones_like(out))


def test_as_torch_dataset_items():
    loaded = load_image_dataset("printed_digits", num_generated_images=20)
    eager = as_torch_dataset(loaded, resolution=28, channels=1)
    lazy = as_torch_dataset(loaded, resolution=28, channels=1, in_memory=False)
    assert len(eager) == len(lazy) == 20 and eager.in_memory and not lazy.in_memory
    for i in (0, 7, np.int64(19), torch.tensor(3)):
        a, b = eager[i], lazy[i]
        assert a["pixel_values"].shape == (1, 28, 28) and a["pixel_values"].dtype == torch.float32
        assert a["labels"].dtype == torch.long and a["labels"].ndim == 0 and int(a["labels"]) == int(i) % 10
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    batch = next(iter(torch.utils.data.DataLoader(eager, batch_size=8)))
    assert batch["pixel_values"].shape == (8, 1, 28, 28) and batch["labels"].tolist() == list(range(8))
    with pytest.raises(IndexError):
        eager[20]

    rgb = as_torch_dataset(loaded, resolution=32, channels=3)
    assert rgb[0]["pixel_values"].shape == (3, 32, 32)

    unconditional = LoadedDataset(
        dataset=loaded.dataset.remove_columns("label"),
        image_column="image",
        label_column=None,
        id2label={},
        source="-",
    )
    for in_memory in (True, False):
        item = as_torch_dataset(unconditional, resolution=28, channels=1, in_memory=in_memory)[4]
        assert int(item["labels"]) == -1


def test_unreadable_images_stop_the_run_or_are_skipped_with_a_count(tmp_path):
    from dp_diffusers.data.loading import drop_unreadable_images

    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "pets" / label / f"{i}.png")
    good = (tmp_path / "pets" / "cat" / "0.png").read_bytes()
    (tmp_path / "pets" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "pets" / "dog" / "text.png").write_bytes(b"not an image at all")
    loaded = load_image_dataset(str(tmp_path / "pets"))
    assert len(loaded.dataset) == 8
    with pytest.raises(UserInputError, match=r"2 image\(s\) .* cannot be decoded.*`skip_bad_images`"):
        drop_unreadable_images(loaded, skip_bad_images=False)
    kept, skipped = drop_unreadable_images(loaded, skip_bad_images=True)
    assert skipped == 2 and len(kept.dataset) == 6 and kept.id2label == loaded.id2label
    assert len(as_torch_dataset(kept, resolution=8, channels=3)) == 6  # every kept image decodes
    clean = load_image_dataset(str(tmp_path / "pets" / "dog"))  # one class folder: no labels, still checked
    assert drop_unreadable_images(clean, skip_bad_images=True)[1] == 1
