"""What ``train_dp_ldm.py`` releases, end to end on a tiny model: nothing in it lets anyone replay the noise or the
sampling, the label set is declared rather than read from the private data, a finished release is never trained
into again, the private loss is not logged by default, and the card states what is treated as public."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from test_train_dp_ldm import (
    N_DIGITS,
    assert_one_line_error,
    capture_output,
    cli,
    independent_epsilon,
    privacy_of,
    run_main_block,
    tensors_of,
)

from dp_diffusers.privacy import ceil_epsilon, format_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHORT = ["--max_train_steps", "2", "--ema_decay", "0"]


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    modules = privacy_of(out)["trained_modules"]
    return {
        k: v
        for k, v in tensors_of(out).items()
        if k.startswith("embedder.") or any(k.startswith(f"unet.{m}.") for m in modules if m != "embedder")
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def secret_run(script, base_model, tmp_path_factory):
    """A run with checkpoints whose secret seeds are recorded by a spy on ``secrets.randbits``."""
    import secrets

    drawn: list[int] = []
    real = secrets.randbits

    def spy(bits):
        drawn.append(real(bits))
        return drawn[-1]

    out = tmp_path_factory.mktemp("secret") / "out"
    secrets.randbits = spy
    try:
        script.main(script.parse_args(cli(base_model, out, *SHORT, "--checkpointing_steps", "1")))
    finally:
        secrets.randbits = real
    return out, drawn


# ---------------------------------------------------------------------------------------------------- randomness


def test_two_runs_with_the_same_seed_give_different_weights(script, base_model, secret_run, tmp_path):
    out = tmp_path / "again"
    script.main(script.parse_args(cli(base_model, out, *SHORT, "--checkpointing_steps", "1")))
    assert json.loads((out / "training_args.json").read_text())["seed"] == 0
    assert not same(trained_tensors(secret_run[0]), trained_tensors(out))
    privacy = privacy_of(out)
    assert privacy["valid_dp_release"] is True and privacy["randomness"]["noise"] == "os_entropy"


def test_no_output_or_checkpoint_holds_the_secret_seeds(secret_run):
    out, drawn = secret_run
    assert len(drawn) == 2  # the noise generator and the Poisson sampler's
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any("checkpoint-" in str(p) for p in files)
    for seed in drawn:
        needles = [str(seed).encode(), struct.pack("<q", seed), struct.pack(">q", seed), struct.pack("<d", seed)]
        leaks = [str(p) for p, data in files.items() for n in needles if n in data]
        assert leaks == [], leaks
    for checkpoint in out.glob("checkpoint-*"):
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        assert set(state["rng"][0]) <= {"python", "numpy", "torch", "cuda"}  # loss-side generators only


def test_resuming_one_checkpoint_twice_draws_fresh_noise(script, base_model, secret_run, tmp_path):
    finals = []
    for name in ("r1", "r2"):
        out = tmp_path / name
        shutil.copytree(secret_run[0] / "checkpoint-1", out / "checkpoint-1")
        script.main(script.parse_args(cli(base_model, out, *SHORT, "--resume_from_checkpoint", "latest")))
        assert privacy_of(out)["steps"] == 2
        finals.append(trained_tensors(out))
    assert not same(*finals)


def test_insecure_reproducible_noise_is_labelled_everywhere(script, base_model, tmp_path, capsys):
    finals = []
    for name in ("i1", "i2"):
        out = tmp_path / name
        with capture_output() as buf:
            script.main(script.parse_args(cli(base_model, out, *SHORT, "--insecure_reproducible_noise")))
        finals.append(trained_tensors(out))
    assert same(*finals)  # reproducible: that is the point, and the danger
    assert "NOT A VALID DP RELEASE" in buf.getvalue()
    privacy = privacy_of(out)
    assert privacy["valid_dp_release"] is False
    assert privacy["randomness"]["noise"] == privacy["randomness"]["sampling"] == "seeded"
    assert "noise reproducible from the seed: NOT a valid DP release" in privacy["randomness"]["noise_source"]
    card = ModelCard.load(out / "README.md")
    assert "NOT A VALID DP RELEASE: noise reproducible from the seed" in card.text
    assert "not-a-valid-dp-release" in card.data.to_dict()["tags"]
    assert card.data.to_dict()["differential_privacy"]["valid_dp_release"] is False
    code, err = run_main_block(
        cli(base_model, tmp_path / "p", "--insecure_reproducible_noise", "--push_to_hub"), capsys
    )
    assert_one_line_error(code, err, "--insecure_reproducible_noise", "--allow_non_private_push")


# ---------------------------------------------------------------------------------------------------- output folder


def test_a_finished_output_folder_is_never_trained_into_again(script, base_model, tmp_path, capsys):
    out = tmp_path / "out"
    script.main(script.parse_args(cli(base_model, out, *SHORT, "--checkpointing_steps", "1")))
    first = privacy_of(out)
    weights = trained_tensors(out)
    for extra in ([], ["--resume_from_checkpoint", "latest"]):
        code, err = run_main_block(cli(base_model, out, *SHORT, *extra), capsys)
        assert_one_line_error(code, err, "finished run", "--overwrite_output_dir")
        assert same(trained_tensors(out), weights) and privacy_of(out) == first
    code, err = run_main_block(
        cli(base_model, out, *SHORT, "--overwrite_output_dir", "--resume_from_checkpoint=latest"), capsys
    )
    assert_one_line_error(code, err, "--overwrite_output_dir", "--resume_from_checkpoint")

    script.main(script.parse_args(cli(base_model, out, "--max_train_steps", "1", "--overwrite_output_dir")))
    second = privacy_of(out)
    assert second["steps"] == 1 and sorted(p.name for p in out.glob("checkpoint-*")) == []
    assert second["previous_release"]["epsilon"] == first["epsilon"]
    text = ModelCard.load(out / "README.md").text
    assert "An earlier release trained on the same private data" in text
    assert f"at least epsilon {format_epsilon(first['epsilon'])} +" in text


def test_checkpoints_of_another_run_are_not_started_over(script, base_model, tmp_path, capsys):
    out = tmp_path / "interrupted"
    (out / "checkpoint-3").mkdir(parents=True)
    code, err = run_main_block(cli(base_model, out, *SHORT), capsys)
    assert_one_line_error(code, err, "checkpoint-3", "--resume_from_checkpoint", "--overwrite_output_dir")
    assert (out / "checkpoint-3").is_dir()


# ---------------------------------------------------------------------------------------------------- logs, card


def test_the_private_loss_is_not_logged_unless_asked(script, base_model, tmp_path):
    quiet, loud = tmp_path / "quiet", tmp_path / "loud"
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, quiet, *SHORT)))
    assert "eps=" in buf.getvalue() and "loss=" not in buf.getvalue()  # the progress bar's postfix, at the end
    assert "logged during training" not in (quiet / "README.md").read_text()
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, loud, *SHORT, "--log_private_loss")))
    assert "loss=" in buf.getvalue()
    assert privacy_of(loud)["private_loss_logged"] is True
    assert "NOT covered: the training loss was logged" in (loud / "README.md").read_text()


def test_the_card_rounds_epsilon_up_and_says_what_is_public(script, base_model, tmp_path):
    out = tmp_path / "card"
    script.main(script.parse_args(cli(base_model, out, *SHORT)))
    privacy = privacy_of(out)
    text = ModelCard.load(out / "README.md").text
    eps = privacy["epsilon"]
    shown = format_epsilon(eps)
    assert float(shown) >= eps and float(shown) == ceil_epsilon(eps)
    assert f"| epsilon (spent, rounded up) | {shown} |" in text
    assert f"N = {N_DIGITS} (the sample rate and the default delta depend on it)" in text
    assert "default from N" in text and privacy["delta_source"] == "default"
    assert "Treated as public: the label set (10 class names)" in text
    assert "OS entropy" in text


def test_epsilon_is_rounded_up():
    assert ceil_epsilon(9.9926) == 9.993 and format_epsilon(9.9926) == "9.993"  # not 9.99 or 9.992
    assert ceil_epsilon(9.993) == 9.993  # already short: unchanged
    assert format_epsilon(29.91652754590985) == "29.92"
    assert format_epsilon(9.99999) == "10"
    assert format_epsilon(None) == "n/a"


# ---------------------------------------------------------------------------------------------------- labels


NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "jay", "koi"]


def _labelled(path: Path, labels: list[str]) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)
    return path


def test_one_example_of_a_rare_class_changes_nothing_but_the_weights(script, base_model, tmp_path, capsys):
    common = [NAMES[1 + i % 9] for i in range(40)]  # no "ant" but this one example
    with_ant = _labelled(tmp_path / "with.parquet", ["ant", *common])
    without = _labelled(tmp_path / "without.parquet", common)
    code, err = run_main_block(cli(base_model, tmp_path / "x", "--dataset_name", str(without)), capsys)
    assert_one_line_error(code, err, "declares no label set", "--class_names")

    outs = []
    for name, data in (("with", with_ant), ("without", without)):
        out = tmp_path / name
        argv = cli(base_model, out, "--dataset_name", str(data), "--class_names", ",".join(NAMES), *SHORT)
        argv += ["--train_batch_size", "8", "--max_physical_batch_size", "8"]
        with capture_output() as buf:
            script.main(script.parse_args(argv))
        assert "label set (10 classes, public) from the class names given as input" in buf.getvalue()
        outs.append(out)
    configs = [{p.relative_to(o).as_posix(): p.read_text() for p in o.rglob("config.json")} for o in outs]
    assert configs[0] == configs[1] and json.loads(configs[0]["embedder/config.json"])["id2label"]["3"] == "dog"
    for out in outs:
        assert (out / "model_index.json").read_text() == (outs[0] / "model_index.json").read_text()
        assert privacy_of(out)["label_set"]["declared_by"] == "the class names given as input (`class_names`)"
    assert [privacy_of(o)["dataset_size"] for o in outs] == [41, 40]  # N is public; nothing else moved

    stray = _labelled(tmp_path / "stray.parquet", ["ant", "owl", "owl", *common])
    argv = cli(base_model, tmp_path / "y", "--dataset_name", str(stray), "--class_names", ",".join(NAMES))
    code, err = run_main_block(argv + ["--train_batch_size", "8"], capsys)
    assert_one_line_error(code, err, "2 example(s)", "outside the 10 declared classes")


def test_a_class_names_file_declares_the_label_set(tmp_path):
    from dp_diffusers.data import load_image_dataset, parse_class_names

    names = tmp_path / "classes.txt"
    names.write_text("\n".join(NAMES[:3]) + "\n")
    data = _labelled(tmp_path / "d.parquet", ["cat", "bee", "cat"])
    loaded = load_image_dataset(str(data), class_names=parse_class_names(str(names)))
    assert loaded.id2label == {0: "ant", 1: "bee", 2: "cat"} and loaded.dataset["label"] == [2, 1, 2]
    assert parse_class_names("a, b ,c") == ("a", "b", "c")


# ---------------------------------------------------------------------------------------------------- empty batches


def test_empty_poisson_batches_on_a_diffusers_model_still_step(script, base_model, tmp_path, monkeypatch):
    """Every other Poisson draw forced empty: the UNet never runs on zero rows, every step is counted."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    real = UniformWithReplacementSampler.__iter__

    def every_other_empty(self):
        for i, batch in enumerate(real(self)):
            yield [] if i % 2 == 0 else batch

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", every_other_empty)
    out = tmp_path / "empty"
    script.main(script.parse_args(cli(base_model, out, "--max_train_steps", "4", "--ema_decay", "0")))
    privacy = privacy_of(out)
    assert privacy["steps"] == 4
    expected = independent_epsilon(privacy["noise_multiplier"], privacy["sample_rate"], 4, privacy["delta"])
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-6)
