import json
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO

import dp_diffusers
from dp_diffusers import DPLDMPipeline
from dp_diffusers.families import FineTuneDefaults, fine_tune_defaults


def test_short_pretraining_lowers_the_loss_and_writes_a_pipeline(tmp_path):
    out = tmp_path / "public"
    cmd = [
        sys.executable,
        str(REPO / "examples" / "pretrain_public_ldm.py"),
        "--model_size",
        "tiny",
        "--num_generated_images",
        "400",
        "--vae_train_steps",
        "30",
        "--unet_train_steps",
        "60",
        "--train_batch_size",
        "32",
        "--lr_warmup_steps",
        "5",
        "--num_grid_per_class",
        "1",
        "--output_dir",
        str(out),
        "--logging_steps",
        "1000",
        "--fine_tune_trainable_scope",
        "full",
        "--fine_tune_learning_rate",
        "2e-3",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    info = json.loads((out / "pretraining.json").read_text())
    assert info["diffusion_loss"]["final_loss_ema"] < info["diffusion_loss"]["first_loss"]
    assert "drawn digits" in info["public_data"]  # the default data: the shipped digit model's
    card = (out / "README.md").read_text()
    assert "drawn digits" in card and "public" in card.lower() and (out / "samples.png").is_file()
    # The recommendation travels with the model: train_dp_ldm.py's defaults from it, and the card says them.
    assert info["fine_tune_defaults"] == {"trainable_scope": "full", "learning_rate": 2e-3}
    assert fine_tune_defaults(str(out)) == FineTuneDefaults(trainable_scope="full", learning_rate=2e-3)
    assert "every denoiser parameter (`--trainable_scope full`)" in card and "learning rate 0.002" in card
    pipe = DPLDMPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0  # the latent scale was measured
    assert not any(p.name.startswith(".public") for p in tmp_path.iterdir())  # stage folders removed


def _printed_digit_classifier():
    """An RBF-SVM on 3,000 printed digits: the judge of 'recognisable' (98-99% on held-out printed digits)."""
    from sklearn.svm import SVC

    from dp_diffusers.data import make_printed_digits

    ds = make_printed_digits(3000, seed=123)
    x = np.stack([np.asarray(im, dtype=np.float32).ravel() / 255.0 for im in ds["image"]])
    return SVC(C=10).fit(x, np.asarray(ds["label"]))


def test_shipped_checkpoint_samples_recognisable_digits():
    pipe = DPLDMPipeline.from_pretrained(dp_diffusers.DEFAULT_PUBLIC_MODEL)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in (pipe.vae, pipe.unet, pipe.embedder) for p in m.parameters())
    assert params * 4 <= 10 * 2**20
    judge = _printed_digit_classifier()
    labels = [c for c in range(10) for _ in range(10)]
    # The defaults (DDIM, eta=0), and the paper's sampler (eta=1), which this small model prefers.
    for eta, threshold in ((0.0, 0.7), (1.0, 0.9)):
        images = pipe(
            class_labels=labels,
            num_inference_steps=50,
            eta=eta,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert images.shape == (100, 28, 28, 1)
        accuracy = float((judge.predict(images.reshape(100, -1)) == np.asarray(labels)).mean())
        assert accuracy >= threshold, f"eta={eta}: only {accuracy:.0%} of the samples are recognised as their class"
