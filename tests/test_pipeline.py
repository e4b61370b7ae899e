import json

import numpy as np
import pytest
import torch

from dp_diffusers import DPLDMPipeline, UserInputError


def sample(pipe, labels=(0, 1, 2), seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe(
        class_labels=list(labels), generator=torch.Generator().manual_seed(seed), output_type="np", **kw
    ).images


def test_output_types_and_shapes(tiny_pipe):
    np_images = sample(tiny_pipe)
    assert np_images.shape == (3, 28, 28, 1) and np_images.dtype == np.float32
    assert 0.0 <= np_images.min() and np_images.max() <= 1.0
    pt = tiny_pipe(class_labels=[0, 1], num_inference_steps=2, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 1, 28, 28)
    pil = tiny_pipe(class_labels=[4], num_inference_steps=2).images
    assert pil[0].size == (28, 28) and pil[0].mode == "L"
    (tup,) = tiny_pipe(class_labels=[4], num_inference_steps=2, output_type="np", return_dict=False)
    assert tup.shape == (1, 28, 28, 1)


def test_save_load_round_trip_is_bit_exact(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DPLDMPipeline" and index["embedder"][1] == "ClassEmbedder"
    loaded = DPLDMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    for name in ("vae", "unet", "embedder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.id2label == tiny_pipe.id2label
    np.testing.assert_array_equal(sample(tiny_pipe), sample(loaded))


def test_round_trip_through_hub_repo_id(tiny_pipe, tmp_path, monkeypatch):
    """A Hub repo id resolves through huggingface_hub's cache, exactly as after a download (offline)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-dp-ldm" / "snapshots" / ("a" * 40)
    tiny_pipe.save_pretrained(snapshot)
    (cache / "models--someone--tiny-dp-ldm" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-dp-ldm" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DPLDMPipeline.from_pretrained("someone/tiny-dp-ldm", cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(tiny_pipe), sample(loaded))


def test_label_names_resolve_to_ids(tiny_pipe):
    assert tiny_pipe.get_label_ids(["zero", "seven", 3, "9"]) == [0, 7, 3, 9]
    by_name = sample(tiny_pipe, labels=["one", "two"])
    by_id = sample(tiny_pipe, labels=[1, 2])
    np.testing.assert_array_equal(by_name, by_id)


@pytest.mark.parametrize("bad", ["eleven", 10, -1, "10"])
def test_unknown_class_is_a_one_line_error(tiny_pipe, bad):
    with pytest.raises(UserInputError, match="Unknown class") as info:
        tiny_pipe(class_labels=[bad], num_inference_steps=2)
    assert "\n" not in str(info.value)


def test_bad_num_inference_steps(tiny_pipe):
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        tiny_pipe(class_labels=[0], num_inference_steps=0)


def test_random_classes_when_labels_are_none(tiny_pipe):
    out = tiny_pipe(class_labels=None, batch_size=5, num_inference_steps=2, output_type="np").images
    assert out.shape[0] == 5


def test_classifier_free_guidance_changes_output(tiny_pipe):
    torch.nn.init.normal_(tiny_pipe.embedder.embedding.weight, std=1.0)  # make conditional != unconditional
    plain = sample(tiny_pipe, guidance_scale=1.0)
    guided = sample(tiny_pipe, guidance_scale=4.0)
    assert np.abs(plain - guided).max() > 1e-3
    # <= 1 is documented as "no guidance": the same images as 1.0; a negative weight is refused
    assert np.array_equal(sample(tiny_pipe, guidance_scale=0.5), plain)
    for bad in (-2.0, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
            sample(tiny_pipe, guidance_scale=bad)


def test_to_dtype_and_progress_bar(tiny_pipe):
    tiny_pipe.to("cpu")
    assert tiny_pipe.device.type == "cpu" and tiny_pipe.dtype == torch.float32
    tiny_pipe.to(torch.bfloat16)
    assert tiny_pipe.unet.dtype == torch.bfloat16
    out = tiny_pipe(class_labels=[0], num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 1, 28, 28)
    tiny_pipe.set_progress_bar_config(disable=False, desc="x")
    assert tiny_pipe._progress_bar_config["desc"] == "x"


def test_missing_or_corrupt_folder_raises_diffusers_own_errors(tmp_path, tiny_pipe):
    """from_pretrained is diffusers' own (no wrapper); the scripts turn its errors into one line (tested there)."""
    with pytest.raises((OSError, ValueError)) as info:
        DPLDMPipeline.from_pretrained(tmp_path / "does-not-exist")
    assert not isinstance(info.value, UserInputError)
    tiny_pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception) as info:
        DPLDMPipeline.from_pretrained(tmp_path / "p")
    assert not isinstance(info.value, UserInputError)
