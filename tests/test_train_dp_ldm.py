"""End-to-end properties of ``train_dp_ldm.py`` on a tiny model and the embedded ``digits`` data (1,797 images).

Most runs are in-process (``main(parse_args([...]))``); bad input goes through the script's own ``__main__`` block
(``runpy``), which is what a shell runs; real subprocesses are used where a process boundary matters: an exit code,
a Hub push over HTTP, and two processes under ``torch.distributed.run``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import runpy
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dp_diffusers.errors import UserInputError
from dp_diffusers.privacy import format_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dp_ldm.py"
N_DIGITS = 1797
TOKEN = "hf_secret_test"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Small logical batches over the embedded digits, tiny sampling grids, no tracker.
COMMON = [
    "--train_batch_size",
    "64",
    "--max_physical_batch_size",
    "32",
    "--num_validation_images",
    "1",
    "--num_inference_steps",
    "2",
    "--report_to",
    "none",
]
# The reference run: 4 steps calibrated to epsilon 10, checkpoints at 2 and 4, raw (non-EMA) weights saved.
RUN_A = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "3", "--ema_decay", "0"]
COMPONENTS = ("vae", "unet", "embedder")


# ---------------------------------------------------------------------------------------------------- helpers


def cli(base: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--output_dir", str(out), *COMMON, *extra]


def subprocess_env(**overrides: str) -> dict:
    env = dict(os.environ)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(overrides)
    return env


@contextlib.contextmanager
def capture_output():
    """Everything an in-process run prints or logs (any logger, INFO and up), as one text buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def run_main_block(argv: list[str], capsys) -> tuple[int, str]:
    """Runs the script's ``if __name__ == "__main__"`` block in-process; returns (exit code, stderr)."""
    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error:") or ": error: " in line, line
    for needle in needles:
        assert needle in line, line
    return line


def privacy_of(out: Path) -> dict:
    return json.loads((out / "privacy.json").read_text())


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for component in COMPONENTS:
        for key, value in load_file(folder / component / "diffusion_pytorch_model.safetensors").items():
            found[f"{component}.{key}"] = value
    return found


WHOLE_UNET = "UNet2DConditionModel (every parameter)"  # how trained_modules names the whole denoiser


def is_trained(key: str, modules: list[str]) -> bool:
    component, rest = key.split(".", 1)
    if component == "embedder":
        return "embedder" in modules
    if component == "unet":
        return WHOLE_UNET in modules or any(rest.startswith(m + ".") for m in modules if m != "embedder")
    return False


def assert_only_trained_changed(base: Path, out: Path) -> None:
    """Every tensor outside ``privacy.json["trained_modules"]`` is bit-identical to the base; every trained one
    changed; the trained tensors count ``trainable_parameters``."""
    privacy = privacy_of(out)
    modules = privacy["trained_modules"]
    before, after = tensors_of(base), tensors_of(out)
    assert before.keys() == after.keys()
    trained = [k for k in before if is_trained(k, modules)]
    frozen = [k for k in before if not is_trained(k, modules)]
    assert any(k.startswith("vae.") for k in frozen)  # the autoencoder never trains
    if WHOLE_UNET not in modules:
        assert any(k.startswith("unet.") for k in frozen)
    changed_frozen = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert changed_frozen == [], f"frozen tensors changed: {changed_frozen[:5]}"
    unchanged_trained = [k for k in trained if torch.equal(before[k], after[k])]
    assert unchanged_trained == [], f"trained tensors did not change: {unchanged_trained[:5]}"
    for module in modules:  # every listed module owns tensors
        prefix = {"embedder": "embedder.", WHOLE_UNET: "unet."}.get(module, f"unet.{module}.")
        assert any(k.startswith(prefix) for k in trained), module
    assert sum(before[k].numel() for k in trained) == privacy["trainable_parameters"]
    assert (out / "scheduler" / "scheduler_config.json").read_text() == (
        base / "scheduler" / "scheduler_config.json"
    ).read_text()


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_token_absent(folder: Path, *texts: str) -> None:
    leaks = [name for name, data in files_under(folder).items() if TOKEN.encode() in data]
    assert leaks == [], f"the Hub token was written to {leaks}"
    for text in texts:
        assert TOKEN not in text


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_a(script, base_model, tmp_path_factory) -> tuple[Path, str]:
    """The reference run (in-process, with a Hub token it must never write or log); returns (folder, output)."""
    out = tmp_path_factory.mktemp("run-a") / "out"
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, out, *RUN_A, "--hub_token", TOKEN)))
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Small private sets: parquet without labels, parquet with 12 classes, an RGB 32x32 image folder."""
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def gray(i: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L")

    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [gray(i) for i in range(12)]}, features=features).to_parquet(
        root / "no_label.parquet"
    )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"image": [gray(i) for i in range(24)], "label": [i % 12 for i in range(24)]}, features=features
    ).to_parquet(root / "twelve_classes.parquet")
    folder = root / "rgb32"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / cls / f"{i}.png")
    bad = root / "bad_images"
    shutil.copytree(folder, bad)
    (bad / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    return {
        "no_label": root / "no_label.parquet",
        "twelve": root / "twelve_classes.parquet",
        "rgb": folder,
        "bad_images": bad,
    }


# ---------------------------------------------------------------------------------------------------- 1. weights


def test_frozen_weights_bit_identical_trained_ones_changed(run_a, base_model):
    out, _ = run_a
    assert (out / "model_index.json").is_file()
    assert_only_trained_changed(base_model, out)
    privacy = privacy_of(out)
    assert privacy["ema_decay"] == 0
    # The paper's choice: every attention block of the UNet (7 with the default layout) and the embedder.
    assert len(privacy["trained_modules"]) == 8 and privacy["trained_modules"][-1] == "embedder"
    assert privacy["trainable_parameters"] < privacy["total_parameters"]


# ---------------------------------------------------------------------------------------------------- 2. privacy.json

REQUIRED_KEYS = {
    "private",
    "epsilon",
    "target_epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "expected_batch_size",
    "steps",
    "epochs",
    "dataset_size",
    "noise_multiplicity",
    "trainable_parameters",
    "total_parameters",
    "trained_modules",
    "base_model",
    "dp_library",
    "unit_of_privacy",
    "world_size",
}


def test_privacy_json_is_complete_and_epsilon_matches_an_independent_accountant(run_a, base_model):
    import opacus

    privacy = privacy_of(run_a[0])
    assert REQUIRED_KEYS <= privacy.keys(), REQUIRED_KEYS - privacy.keys()
    assert privacy["private"] is True
    assert privacy["accountant"] == "prv"
    assert privacy["dp_library"] == {"name": "opacus", "version": opacus.__version__}
    assert privacy["unit_of_privacy"] == "one training image"
    assert privacy["world_size"] == 1
    assert privacy["base_model"] == str(base_model)
    assert privacy["dataset_size"] == N_DIGITS
    assert privacy["expected_batch_size"] == 64
    assert privacy["sample_rate"] == 64 / N_DIGITS
    assert privacy["steps"] == 4
    assert privacy["epochs"] == pytest.approx(4 * 64 / N_DIGITS)
    assert privacy["noise_multiplicity"] == 1
    assert privacy["max_grad_norm"] == 1e-3
    assert privacy["delta"] == 1e-5  # the default for N = 1,797: largest power of ten <= 1/(10 N)
    assert privacy["target_epsilon"] == 10.0
    expected = independent_epsilon(privacy["noise_multiplier"], 64 / N_DIGITS, privacy["steps"], privacy["delta"])
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert privacy["epsilon"] <= privacy["target_epsilon"]
    assert privacy["epsilon"] > privacy["target_epsilon"] - 0.1  # sigma was calibrated to the budget, not padded


# ---------------------------------------------------------------------------------------------------- 3. model card


def test_model_card_reports_the_privacy_json_numbers(run_a):
    from huggingface_hub import ModelCard

    out = run_a[0]
    privacy = privacy_of(out)
    card = ModelCard.load(out / "README.md")
    text = card.text
    data = card.data.to_dict()
    assert {"diffusers", "differential-privacy", "dp-ldm"} <= set(data["tags"])
    assert "not-differentially-private" not in data["tags"]
    meta = data["differential_privacy"]
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "dataset_size"):
        assert meta[key] == pytest.approx(privacy[key], rel=1e-12), key
    eps, delta = privacy["epsilon"], privacy["delta"]
    # Rounded for people (epsilon and delta up); privacy.json and the card's metadata keep the full values.
    assert f"({format_epsilon(eps)}, {format_epsilon(delta, digits=3)})-DP" in text
    assert f"| epsilon (spent, rounded up) | {format_epsilon(eps)} |" in text
    assert f"| delta | {format_epsilon(delta, digits=3)} (default from N" in text
    assert f"| noise multiplier (sigma) | {privacy['noise_multiplier']:.4g} |" in text
    assert f"| max grad norm (C, per-example flat clipping) | {privacy['max_grad_norm']} |" in text
    assert f"sample rate q = {privacy['sample_rate']:.4g}" in text
    assert f"| steps / epochs | {privacy['steps']} / {privacy['epochs']:.3g} |" in text
    assert "NOT differentially private" not in text
    # The grid's sampling settings are stated (the class-conditional family's default guidance).
    assert "one row per class: DDIM 2 steps, classifier-free guidance 2." in text


def test_disable_dp_run_says_not_private(script, base_model, tmp_path):
    out = tmp_path / "nodp"
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, out, "--disable_dp", "--max_train_steps", "2")))
    privacy = privacy_of(out)
    assert privacy["private"] is False and privacy["epsilon"] is None and privacy["noise_multiplier"] is None
    assert privacy["steps"] == 2
    text = (out / "README.md").read_text()
    assert "NOT differentially private" in text
    assert "not-differentially-private" in text and "differential-privacy" in text
    assert "NOT DIFFERENTIALLY PRIVATE" in buf.getvalue()
    assert_only_trained_changed(base_model, out)  # EMA on (default): frozen weights still bit-identical


# ---------------------------------------------------------------------------------------------------- 4. resume


def _engine_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)["engine"]


def test_resume_ends_with_the_same_steps_and_epsilon(script, run_a, base_model, tmp_path):
    ref = run_a[0]
    # An interrupted run: only checkpoint-2 survived (final outputs and checkpoint-4 gone).
    out = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoint-2", out / "checkpoint-2")
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, out, *RUN_A, "--resume_from_checkpoint", "latest")))
    assert "at step 2" in buf.getvalue() and "Resumed" in buf.getvalue()
    resumed, uninterrupted = privacy_of(out), privacy_of(ref)
    for key in ("steps", "epsilon", "noise_multiplier", "sample_rate", "delta", "dataset_size"):
        assert resumed[key] == uninterrupted[key], key
    # The accountant history survives the checkpoint: 2 steps in checkpoint-2, and both runs' checkpoint-4 agree.
    sigma, q = uninterrupted["noise_multiplier"], uninterrupted["sample_rate"]
    assert [tuple(h) for h in _engine_state(out / "checkpoint-2")["history"]] == [(sigma, q, 2)]
    assert _engine_state(out / "checkpoint-4")["history"] == _engine_state(ref / "checkpoint-4")["history"]
    assert [tuple(h) for h in _engine_state(ref / "checkpoint-4")["history"]] == [(sigma, q, 4)]
    # The DP time reported is that of all the steps kept: checkpoint-2's seconds plus this run's.
    before = torch.load(out / "checkpoint-2" / "state.pt", map_location="cpu", weights_only=True)["train_seconds"]
    assert before > 0 and resumed["train_seconds_this_run"] > 0
    assert resumed["train_seconds"] == pytest.approx(before + resumed["train_seconds_this_run"], abs=0.11)
    assert uninterrupted["train_seconds"] == uninterrupted["train_seconds_this_run"]
    assert_only_trained_changed(base_model, out)


KILLABLE = """
import sys, time
import dp_diffusers.checkpointing as checkpointing

slow = int(sys.argv[1])  # >= 0: sleep inside the atomic write of checkpoint-<slow>, so a kill lands mid-write
real_save = checkpointing.save_file

def save_file(tensors, path, *args, **kwargs):
    real_save(tensors, path, *args, **kwargs)
    if f".checkpoint-{slow}.tmp-" in str(path):
        print("WRITING", flush=True)
        time.sleep(600)

checkpointing.save_file = save_file
sys.argv = [sys.argv[2], *sys.argv[3:]]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_three_sigkills_one_mid_checkpoint_then_resume_end_like_an_uninterrupted_run(base_model, tmp_path):
    """SIGKILL after checkpoint 2, while checkpoint 3 is being written, and after checkpoint 4; the resumed run ends
    with the planned steps and the epsilon of an uninterrupted run, and no half-written checkpoint is ever used."""
    import signal
    import time

    out = tmp_path / "killed"
    wrapper = tmp_path / "killable.py"
    wrapper.write_text(KILLABLE)
    steps = 6
    argv = cli(base_model, out, "--max_train_steps", str(steps), "--checkpointing_steps", "1")
    argv += ["--checkpoints_total_limit", "10", "--ema_decay", "0"]

    def run_until(condition, *, slow: int, resume: bool) -> None:
        extra = ["--resume_from_checkpoint", "latest"] if resume else []
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), str(slow), str(SCRIPT), *argv, *extra],
            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        deadline = time.time() + 300
        while not condition(proc) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    done = lambda k: lambda proc: (out / f"checkpoint-{k}" / "state.pt").is_file()  # noqa: E731
    run_until(done(2), slow=-1, resume=False)
    writing = lambda proc: any(out.glob(".checkpoint-3.tmp-*/trained.safetensors"))  # noqa: E731
    run_until(writing, slow=3, resume=True)
    assert not (out / "checkpoint-3").exists() and any(out.glob(".checkpoint-3.tmp-*"))  # left half-written
    run_until(done(4), slow=-1, resume=True)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--resume_from_checkpoint", "latest"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    privacy = privacy_of(out)
    assert privacy["steps"] == steps
    sigma, q = privacy["noise_multiplier"], privacy["sample_rate"]
    assert privacy["epsilon"] == pytest.approx(independent_epsilon(sigma, q, steps, privacy["delta"]), rel=1e-6)
    assert [tuple(h) for h in _engine_state(out / f"checkpoint-{steps}")["history"]] == [(sigma, q, steps)]
    assert_only_trained_changed(base_model, out)


def test_resume_with_another_noise_multiplier_is_refused_by_the_process(run_a, base_model, tmp_path):
    out = tmp_path / "refused"
    shutil.copytree(run_a[0] / "checkpoint-2", out / "checkpoint-2")
    argv = cli(base_model, out, *RUN_A, "--resume_from_checkpoint", "latest", "--noise_multiplier", "2.0")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "noise_multiplier", "--noise_multiplier")
    assert not (out / "model_index.json").exists()
    # The private latents were cached (reused by the corrected run); no model, no other output.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint-2", "latent_cache"]


def test_resume_with_another_batch_size_is_refused(run_a, base_model, tmp_path, capsys):
    out = tmp_path / "refused"
    shutil.copytree(run_a[0] / "checkpoint-2", out / "checkpoint-2")
    argv = cli(base_model, out, *RUN_A, "--resume_from_checkpoint", "latest", "--train_batch_size", "32")
    assert_one_line_error(*run_main_block(argv, capsys), "sample_rate", "--train_batch_size")
    assert not (out / "model_index.json").exists()


# ---------------------------------------------------------------------------------------------------- 5. budget


def test_budget_stops_before_exceeding_epsilon(script, base_model, tmp_path):
    q, delta, sigma = 64 / N_DIGITS, 1e-5, 1.0
    eps3, eps4 = (independent_epsilon(sigma, q, t, delta) for t in (3, 4))
    target = (eps3 + eps4) / 2  # 3 steps fit, a 4th would exceed
    out = tmp_path / "budget"
    args = script.parse_args(cli(base_model, out, "--noise_multiplier", str(sigma), "--epsilon", repr(target)))
    # No planned length: run until the budget is spent (PrivacyConfig allows it with both sigma and epsilon; the
    # command line always plans, through --num_train_epochs' default).
    args.num_train_epochs, args.max_train_steps = None, None
    with capture_output() as buf:
        script.main(args)
    privacy = privacy_of(out)
    assert privacy["steps"] == 3
    assert privacy["planned_steps"] is None
    assert privacy["epsilon"] == pytest.approx(eps3, rel=1e-6)
    assert privacy["epsilon"] <= target < eps4
    assert "Stopped after 3 steps: one more would exceed epsilon" in buf.getvalue()
    assert_only_trained_changed(base_model, out)  # EMA on (default): frozen weights still bit-identical


def test_noise_multiplier_that_overspends_epsilon_is_refused(base_model, tmp_path, capsys):
    # PrivacyConfig.validate: a fixed sigma whose planned steps would spend more than --epsilon is refused up front.
    out = tmp_path / "out"
    argv = cli(base_model, out, "--max_train_steps", "4", "--noise_multiplier", "0.5", "--epsilon", "1")
    assert_one_line_error(*run_main_block(argv, capsys), "--noise_multiplier 0.5 spends epsilon", "--epsilon")
    assert not (out / "model_index.json").exists()


def test_noise_multiplier_within_epsilon_is_used_as_given(script, base_model, tmp_path):
    out = tmp_path / "fixed"
    script.main(script.parse_args(cli(base_model, out, "--max_train_steps", "2", "--noise_multiplier", "1.5")))
    privacy = privacy_of(out)
    assert privacy["noise_multiplier"] == 1.5 and privacy["steps"] == 2 and privacy["target_epsilon"] == 10.0
    assert privacy["epsilon"] == pytest.approx(independent_epsilon(1.5, 64 / N_DIGITS, 2, 1e-5), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- 6. bad input

BAD_INPUT = {
    "epsilon_zero": (["--epsilon", "0"], ["--epsilon must be a positive number"]),
    "epsilon_negative": (["--epsilon", "-1"], ["--epsilon must be a positive number"]),
    "delta_zero": (["--delta", "0"], ["--delta must be in (0, 1/N)"]),
    "delta_too_big": (["--delta", "0.001"], ["--delta must be in (0, 1/N)", "--delta 1e-05"]),
    "max_grad_norm_zero": (["--max_grad_norm", "0"], ["--max_grad_norm must be a positive number"]),
    "physical_above_logical": (["--max_physical_batch_size", "128"], ["--max_physical_batch_size", "at most 64"]),
    "dataset_smaller_than_batch": (
        ["--train_batch_size", "5000"],
        ["fewer than the logical batch", "--train_batch_size", "at most 1797"],
    ),
    "unknown_preset": (["--dataset_name", "no_such_preset"], ["unknown dataset 'no_such_preset'"]),
    "target_modules_and_scope": (
        ["--target_modules", "to_q", "--trainable_scope", "full"],
        ["--target_modules chooses the modules by itself", "--trainable_scope would be ignored"],
    ),
    "rank_without_lora": (["--rank", "8"], ["--rank and --lora_alpha apply to LoRA adapters only", "--use_lora"]),
    "missing_label_column": (["--label_column", "nope"], ["no column 'nope'", "--label_column"]),
    "parquet_without_labels": (["--dataset_name", "{no_label}"], ["has no labels", "one subfolder per class"]),
    "parquet_without_labels_named": (
        ["--dataset_name", "{no_label}", "--label_column", "label"],
        ["has no labels", "one subfolder per class", "metadata.csv", "unconditional base model"],
    ),
    "labels_beyond_the_embedder": (
        [
            "--dataset_name",
            "{twelve}",
            "--class_names",
            "a,b,c,d,e,f,g,h,i,j,k,l",
            "--train_batch_size",
            "8",
            "--max_physical_batch_size",
            "8",
        ],  # fmt: skip
        ["The private data has 12 classes but the base model's embedder has 10"],
    ),
    "weights_diverge": (["--learning_rate", "1e37"], ["Step 2", "NaN or inf", "--learning_rate"]),
    "ghost_under_bf16": (["--grad_sample_mode", "ghost", "--mixed_precision", "bf16"], ["clip bound", "bookkeeping"]),
    "label_set_not_declared": (["--dataset_name", "{twelve}"], ["declares no label set", "--class_names"]),
    "push_non_private": (["--disable_dp", "--push_to_hub"], ["--allow_non_private_push"]),
    "unreadable_images": (
        ["--dataset_name", "{bad_images}"],
        ["1 image(s)", "cannot be decoded", "--skip_bad_images"],
    ),
    "resolution_not_a_multiple": (["--resolution", "30"], ["--resolution=30", "factor 4", "e.g. 28 or 32"]),
    "class_names_twice": (["--class_names", "a,b,a"], ["names a class twice"]),
    "class_names_against_the_schema": (["--class_names", "a,b"], ["declares the classes", "--class_names"]),
    "max_train_samples_zero": (["--max_train_samples", "0"], ["--max_train_samples must be >= 1"]),
    "negative_guidance": (["--guidance_scale", "-1"], ["--guidance_scale must be >= 0"]),
    "overwrite_and_resume": (
        ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
        ["--overwrite_output_dir", "--resume_from_checkpoint"],
    ),
    "fp16_refused": (["--mixed_precision", "fp16"], ["--mixed_precision", "invalid choice"]),
    "missing_base_model": (["--pretrained_model_name_or_path", "{missing}"], ["No pipeline at", "model_index.json"]),
    # (--noise_multiplier: skips calibrating sigma, which these cases would reach before failing)
    "missing_checkpoint": (
        ["--resume_from_checkpoint", "checkpoint-999", "--noise_multiplier", "1"],
        ["--resume_from_checkpoint"],
    ),
    "resume_other_trainable": (
        ["--resume_from_checkpoint", "{checkpoint}", "--freeze_embedder", "--noise_multiplier", "1"],
        ["trained other parameters", "--freeze_embedder"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_error_and_writes_no_model(case, base_model, data_files, tmp_path, capsys, request):
    extra, needles = BAD_INPUT[case]
    places = {**data_files, "missing": tmp_path / "no-such-model"}
    if any("{checkpoint}" in a for a in extra):
        places["checkpoint"] = request.getfixturevalue("run_a")[0] / "checkpoint-2"
    extra = [a.format(**places) for a in extra]
    out = tmp_path / "out"
    code, stderr = run_main_block(cli(base_model, out, "--max_train_steps", "2", *extra), capsys)
    assert_one_line_error(code, stderr, *needles)
    assert not (out / "model_index.json").exists()
    assert not (out / "privacy.json").exists()


def test_plan_prints_the_numbers_and_writes_nothing(script, base_model, tmp_path, capsys):
    out = tmp_path / "planned"
    capsys.readouterr()
    args = script.parse_args(cli(base_model, out, "--plan", "--max_train_steps", "8", "--epsilon", "0.05"))
    script.main(args)
    printed = capsys.readouterr().out
    assert not out.exists()  # no folder, no grid, no checkpoint
    for key in ("planned_steps", "noise_multiplier", "noise_to_signal", "sample_rate", "estimated_seconds"):
        assert key in printed
    assert "planned_steps: 8" in printed and "warning: noise-to-signal above 0.1" in printed
    facts = script.plan(args, script.load_family(str(base_model)), script.load_image_dataset("digits"), "cpu")
    assert facts["dataset_size"] == N_DIGITS and facts["sample_rate"] == 64 / N_DIGITS
    assert facts["noise_to_signal"] == facts["noise_multiplier"] / 64 > 0.1
    assert facts["seconds_per_step"] > 0 and facts["estimated_seconds"] == facts["seconds_per_step"] * 8
    assert facts["epsilon_after_planned_steps"] <= 0.05


@pytest.mark.parametrize("scope", ["attention_up_resnets", "full"])
def test_every_named_scope_trains_to_the_end_and_the_card_names_it(script, base_model, tmp_path, scope):
    """The whole run, outputs included, for the scopes beyond the paper's (run_a covers attention_blocks)."""
    from dp_diffusers.trainable import SCOPE_DESCRIPTIONS

    out = tmp_path / scope
    script.main(script.parse_args(cli(base_model, out, "--max_train_steps", "1", "--trainable_scope", scope)))
    privacy = privacy_of(out)
    assert privacy["steps"] == 1
    assert privacy["trained_parameters_kind"].startswith(f"full weights of {SCOPE_DESCRIPTIONS[scope]}")
    # The card's summary names what trained, not the paper's default (attention only).
    summary = " ".join((out / "README.md").read_text().split())
    assert f"fine-tuned on the private data with DP-SGD: full weights of {SCOPE_DESCRIPTIONS[scope]}" in summary
    assert "only its attention modules" not in summary
    if scope == "full":
        assert privacy["trained_modules"] == [WHOLE_UNET, "embedder"]
    assert_only_trained_changed(base_model, out)
    if scope == "attention_up_resnets":
        assert any(".resnets." in m and m.startswith("up_blocks.") for m in privacy["trained_modules"])
        assert not any(m.startswith("down_blocks.") and ".resnets." in m for m in privacy["trained_modules"])


def test_resolution_trains_and_samples_at_another_size(script, base_model, tmp_path):
    out = tmp_path / "r56"
    with capture_output() as buf:
        script.main(script.parse_args(cli(base_model, out, "--max_train_steps", "1", "--resolution", "56")))
    assert "converted to 1x56x56" in buf.getvalue()
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 14  # the latent side
    assert_only_trained_changed(base_model, out)  # the weights are the base's, but for the trained ones
    from dp_diffusers import DPLDMPipeline

    pipe = DPLDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[0], num_inference_steps=1, output_type="np").images.shape == (1, 56, 56, 1)


def test_every_flag_has_help_and_shows_its_default_once(script):
    parser = script.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and action.help.strip(), action.option_strings
        appended = formatter._get_help_string(action) != action.help  # argparse's "(default: X)"
        assert not (appended and "default" in action.help.lower()), action.dest  # never two defaults
        assert not (appended and action.default is None), action.dest  # never "(default: None)"
    flags = {s for a in parser._actions for s in a.option_strings}
    wanted = ["--resolution", "--center_crop", "--random_flip", "--max_train_samples", "--dataloader_num_workers"]
    wanted += ["--revision", "--variant", "--cache_dir", "--rank", "--lora_rank", "--use_ema", "--validation_epochs"]
    wanted += ["--tracker_project_name"]
    for flag in wanted:
        assert flag in flags, flag
    args = script.parse_args(["--use_lora", "--rank", "8"])
    assert args.lora_rank == 8 and script.parse_args(["--use_lora", "--lora_rank", "2"]).lora_rank == 2


def test_the_domain_general_prior_trains_more_and_faster_unless_told(script, tmp_path):
    """From the far prior the measured defaults apply (attention + up-path ResNets, 3e-3); from any other base the
    paper's (attention blocks, 1e-3); whatever the user sets wins, and a user's own choice of modules is kept."""
    from dp_diffusers import DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL

    out = ["--output_dir", str(tmp_path / "o")]
    far = script.parse_args(["--pretrained_model_name_or_path", GENERAL_PUBLIC_MODEL, *out])
    assert (far.trainable_scope, far.learning_rate) == ("attention_up_resnets", 3e-3)
    preset = script.parse_args(["--dataset_name", "fashion_mnist", *out])  # its recommended base is the far prior
    assert (preset.trainable_scope, preset.learning_rate) == ("attention_up_resnets", 3e-3)
    same_folder = script.parse_args(["--pretrained_model_name_or_path", GENERAL_PUBLIC_MODEL + "/", *out])
    assert same_folder.trainable_scope == "attention_up_resnets"
    close_base = ["--pretrained_model_name_or_path", DEFAULT_PUBLIC_MODEL]
    for close in (script.parse_args(out), script.parse_args(close_base)):
        assert (close.trainable_scope, close.learning_rate) == (None, 1e-3)
    told = ["--pretrained_model_name_or_path", GENERAL_PUBLIC_MODEL, "--learning_rate", "1e-4"]
    told = script.parse_args([*told, "--trainable_scope", "full"])
    assert (told.trainable_scope, told.learning_rate) == ("full", 1e-4)
    for own in (["--use_lora"], ["--attention_layers", "3-7"], ["--target_modules", "to_q"]):
        args = script.parse_args(["--pretrained_model_name_or_path", GENERAL_PUBLIC_MODEL, *own])
        assert args.trainable_scope is None and args.learning_rate == 3e-3, own
    # The recommendation lives in the prior's pretraining.json, so a copy elsewhere keeps it ...
    copy = tmp_path / "my-copy-of-the-prior"
    shutil.copytree(GENERAL_PUBLIC_MODEL, copy)
    moved = script.parse_args(["--pretrained_model_name_or_path", str(copy), *out])
    assert (moved.trainable_scope, moved.learning_rate) == ("attention_up_resnets", 3e-3)
    # ... and a broken one is a one-line error, unless the user sets both values themselves.
    info = json.loads((copy / "pretraining.json").read_text())
    info["fine_tune_defaults"] = {"trainable_scope": "everything", "learning_rate": 3e-3}
    (copy / "pretraining.json").write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="fine_tune_defaults must be"):
        script.parse_args(["--pretrained_model_name_or_path", str(copy), *out])
    mine = ["--trainable_scope", "attention_blocks", "--learning_rate", "1e-3"]
    assert script.parse_args(["--pretrained_model_name_or_path", str(copy), *mine, *out]).learning_rate == 1e-3


def test_a_preset_base_missing_offline_fails_fast_with_the_way_out(tmp_path, capsys):
    """The headline usage without Hub access: one line naming the preset's public base, why, and the local way."""
    argv = ["--dataset_name", "celeba", "--epsilon", "10", "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    line = assert_one_line_error(*run_main_block(argv, capsys), "facebook/DiT-XL-2-256", "ImageNet")
    assert "HF_HUB_OFFLINE is set" in line and "--pretrained_model_name_or_path=<folder>" in line
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_rgb_images_of_another_size_are_converted_and_train(script, base_model, data_files, tmp_path):
    out = tmp_path / "rgb"
    argv = cli(base_model, out, "--dataset_name", str(data_files["rgb"]), "--max_train_steps", "1")
    argv += ["--train_batch_size", "8", "--max_physical_batch_size", "4", "--noise_multiplier", "1.0"]
    argv += ["--random_flip", "--center_crop"]
    with capture_output() as buf:
        script.main(script.parse_args(argv))
    assert "16 images, converted to 1x28x28" in buf.getvalue()
    # --random_flip: the cache holds each image both ways.
    (manifest,) = (out / "latent_cache").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["flip"] is True
    import datasets

    (shard,) = manifest.parent.glob("*.arrow")
    assert datasets.Dataset.from_file(str(shard)).column_names == [
        "t0",
        "t1",
        "t2",
        "flipped_t0",
        "flipped_t1",
        "flipped_t2",
    ]
    privacy = privacy_of(out)
    assert privacy["dataset_size"] == 16 and privacy["steps"] == 1 and privacy["sample_rate"] == 0.5
    assert_only_trained_changed(base_model, out)
    # The folder names are the classes: they reach the log, id2label, the card's usage and the grid.
    from dp_diffusers import DPLDMPipeline

    assert "'cat' -> row 0 (was 'zero'), 'dog' -> row 1 (was 'one'); rows 2..9 unused" in buf.getvalue()
    pipe = DPLDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.id2label == {0: "cat", 1: "dog"}
    assert len(pipe(class_labels=["dog"], num_inference_steps=1, output_type="np").images) == 1
    drawn = pipe(batch_size=6, num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert drawn.images.shape[0] == 6
    assert 'class_labels=["cat", "dog"]' in (out / "README.md").read_text()  # double quotes: ruff-clean cards
    from PIL import Image

    assert Image.open(out / "samples.png").size[1] == 2 * 28  # one row per private class


def test_a_second_run_reuses_the_latent_cache_without_encoding(script, run_a, base_model, tmp_path, monkeypatch):
    out_a, _ = run_a
    cache_dir = out_a / "latent_cache"
    shards = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.arrow")}
    assert len(shards) == 1
    assert privacy_of(out_a)["private_latent_cache"].startswith("latent_cache/")
    assert "latent_cache/" in (out_a / "README.md").read_text()
    from dp_diffusers.families import ClassConditionalLDM

    def encode_again(*args, **kwargs):
        raise AssertionError("the private latents were encoded again")

    monkeypatch.setattr(ClassConditionalLDM, "encode", encode_again)
    out = tmp_path / "again"
    argv = cli(base_model, out, "--max_train_steps", "1", "--checkpointing_steps", "0")
    with capture_output() as buf:
        script.main(script.parse_args([*argv, "--latent_cache_dir", str(cache_dir)]))
    assert f"reusing the cache in {cache_dir}" in buf.getvalue()
    # The cache's key is a hash that changes when one private example does: no log or output outside the cache
    # may show it (the card and privacy.json name the cache's root folder only).
    key = next(iter(shards)).parent.name
    assert key not in buf.getvalue() and key not in run_a[1]
    for folder in (out, out_a):
        shown = [
            n for n, data in files_under(folder).items() if not n.startswith("latent_cache/") and key.encode() in data
        ]
        assert shown == [], shown
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*.arrow")} == shards
    assert not (out / "latent_cache").exists() and privacy_of(out)["steps"] == 1
    assert "--latent_cache_dir" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------- 7. token


def test_hub_token_is_never_logged_or_saved(run_a):
    out, output = run_a
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())
    assert json.loads((out / "training_args.json").read_text())["ema_decay"] == 0  # the args were saved
    assert "Wrote" in output  # the capture did see the run's log
    assert_token_absent(out, output)


# ---------------------------------------------------------------------------------------------------- 8. push


class FakeHub:
    """Just enough of the Hub API for ``create_repo`` + ``upload_folder`` (huggingface_hub 2.x): every file is
    answered "regular" at preupload, so its bytes arrive base64-encoded inside the NDJSON commit."""

    def __init__(self, *, fail_commit: bool = False):
        self.fail_commit = fail_commit  # answer the upload's commit with a 500, as a Hub outage mid-upload would
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.unexpected: list[str] = []
        self.validated: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body() if self.command in ("POST", "PUT") else b""
                path = urlsplit(self.path).path
                with hub.lock:
                    hub.requests.append(
                        {"method": self.command, "url": self.path, "headers": dict(self.headers), "body": body}
                    )
                if self.command == "POST" and path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}"
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if self.command == "POST" and path == "/api/validate-yaml":
                    card = json.loads(body)["content"]
                    ok = card.startswith("---\n") and isinstance(yaml.safe_load(card.split("---\n")[1]), dict)
                    hub.validated.append(card)
                    return self._reply(200 if ok else 400, {"errors": [] if ok else [{"message": "bad"}]})
                if self.command == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                if self.command == "POST" and path.startswith("/api/models/") and "/commit/" in path:
                    if hub.fail_commit:
                        return self._reply(500, {"error": "Internal Server Error"})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file" and item["value"]["encoding"] == "base64":
                            with hub.lock:
                                hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] != "header":
                            hub.unexpected.append(f"commit item {item['key']}")
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(
                        200,
                        {"commitUrl": f"{hub.endpoint}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40},
                    )
                hub.unexpected.append(f"{self.command} {self.path}")
                return self._reply(404, {"error": "not in the fake hub"})

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        return Handler


def test_a_failed_push_keeps_the_model_and_says_how_to_upload_the_release_only(base_model, tmp_path):
    out = tmp_path / "failed"
    argv = cli(base_model, out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    argv += ["--push_to_hub", "--hub_model_id", "me/tiny"]
    with FakeHub(fail_commit=True) as hub:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *argv],
            cwd=REPO,
            env=subprocess_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_TOKEN="hf_x"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    line = assert_one_line_error(proc.returncode, proc.stderr, "Push to the Hub failed", "the model is saved")
    assert f"hf upload me/tiny {out} --include" in line and '"privacy.json"' in line and '"unet/*"' in line
    assert "checkpoint" not in line.split("--include")[1] and "logs" not in line.split("--include")[1]
    assert (out / "model_index.json").is_file() and privacy_of(out)["steps"] == 1
    assert (out / "checkpoint-1").is_dir()


def test_push_to_hub_uploads_the_model_and_privacy_files_and_only_sends_the_token_as_auth(base_model, tmp_path):
    out = tmp_path / "pushed"
    argv = cli(base_model, out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    argv += ["--push_to_hub", "--hub_model_id", "me/tiny", "--hub_token", TOKEN]
    with FakeHub() as hub:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *argv],
            cwd=REPO,
            env=subprocess_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert hub.unexpected == []
    local = files_under(out)
    assert any(name.startswith("checkpoint-") for name in local)  # there were checkpoints to leave out
    assert any(name.startswith("validation/") for name in local)  # intermediate grids, not part of the release
    assert any(name.startswith("latent_cache/") for name in local)  # the private latents: never uploaded
    leave = ("checkpoint-", "logs/", "validation/", "latent_cache/", ".")
    expected = {name: data for name, data in local.items() if not name.startswith(leave)}
    for name in (
        "privacy.json",
        "README.md",
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "embedder/diffusion_pytorch_model.safetensors",
    ):
        assert name in hub.files, name
    assert hub.files.keys() == expected.keys()
    assert all(hub.files[name] == data for name, data in expected.items())
    assert not any(name.startswith("checkpoint-") for name in hub.files)
    assert privacy_of(out)["private"] is True
    # The token travels only as the Authorization header, of every request; never in a URL or a body.
    assert hub.validated == [expected["README.md"].decode()]  # the card's YAML metadata was checked before upload
    urls = {r["url"].split("?")[0] for r in hub.requests}
    assert {"/api/repos/create", "/api/validate-yaml", "/api/models/me/tiny/commit/main"} <= urls
    for r in hub.requests:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers.get("authorization") == f"Bearer {TOKEN}"
        assert TOKEN not in r["url"] and TOKEN.encode() not in r["body"]
        assert not any(TOKEN in v for k, v in headers.items() if k != "authorization")
    assert_token_absent(out, proc.stdout, proc.stderr)
    assert_only_trained_changed(base_model, out)  # EMA on (default): frozen weights still bit-identical


# ---------------------------------------------------------------------------------------------------- 9. two processes

RANK_DUMP = """
import importlib.util, os, sys
from safetensors.torch import save_file

spec = importlib.util.spec_from_file_location("train_dp_ldm", sys.argv[1])
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


from dp_diffusers import families


class Recording(families.ClassConditionalLDM):
    made = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        family = super().from_pretrained(path, **kwargs)
        cls.made.append(family)
        return family


families.FAMILIES[families.FAMILIES.index(families.ClassConditionalLDM)] = Recording
script.main(script.parse_args(sys.argv[2:]))
family = Recording.made[0]
tensors = {f"unet.{k}": v for k, v in family.unet.state_dict().items()}
tensors.update({f"embedder.{k}": v for k, v in family.embedder.state_dict().items()})
save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
          os.path.join(os.environ["RANK_DUMP_DIR"], f"rank{os.environ['RANK']}.safetensors"))
"""


def test_two_processes_give_the_same_privacy_and_identical_replicas(run_a, base_model, tmp_path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    wrapper = tmp_path / "rank_dump.py"
    wrapper.write_text(RANK_DUMP)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    out = tmp_path / "two"
    argv = cli(base_model, out, "--max_train_steps", "4", "--ema_decay", "0", "--checkpointing_steps", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(wrapper), str(SCRIPT), *argv]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env=subprocess_env(RANK_DUMP_DIR=str(dumps)),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Accelerate sees both processes (one main process: one writer, one log of the run).
    assert "world size 2" in proc.stderr and proc.stderr.count(f"Wrote {out}") == 1, proc.stderr[-4000:]
    # Each process encoded its own half of the private latents, into one cache equal to the one-process run's.
    half = N_DIGITS // 2
    assert f"process 0 of 2 encoded rows 0..{half - 1}" in proc.stderr
    assert f"process 1 of 2 encoded rows {half}..{N_DIGITS - 1}" in proc.stderr
    from dp_diffusers.data.latent_cache import LatentCache

    (two_cache,) = (out / "latent_cache").iterdir()
    (one_cache,) = (run_a[0] / "latent_cache").iterdir()
    assert two_cache.name == one_cache.name  # the same key: the process count is not part of it
    assert sorted(p.name for p in two_cache.glob("*.arrow")) == [
        "shard-00000-of-00002.arrow",
        "shard-00001-of-00002.arrow",
    ]
    two_rows = LatentCache(two_cache.parent, two_cache.name).load().tensors
    one_rows = LatentCache(one_cache.parent, one_cache.name).load().tensors
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(two_rows, one_rows, strict=True))
    two, one = privacy_of(out), privacy_of(run_a[0])
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("epsilon", "steps", "sample_rate", "noise_multiplier", "delta", "dataset_size", "expected_batch_size"):
        assert two[key] == one[key], key
    assert_only_trained_changed(base_model, out)
    # Noise is added once and the gradient all-reduced, so both replicas hold bit-identical weights (independent
    # noise per rank would make them differ), and rank 0's are the ones saved.
    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    saved = tensors_of(out)
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)
