"""Evaluation: downstream-accuracy protocol, Fréchet distances, the samples format, resumable sampling, the CLI."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dp_diffusers import UserInputError
from dp_diffusers.evaluation import (
    DPIB_CLASSIFIERS,
    class_grid,
    compute_stats,
    downstream_accuracy,
    downstream_accuracy_over,
    fd_classifier,
    frechet_distance,
    generate_samples,
    inception_fid,
    load_labelled_images,
    load_npz,
    save_npz,
    write_report,
)
from dp_diffusers.evaluation import downstream as downstream_module
from dp_diffusers.evaluation import fid as fid_module
from dp_diffusers.evaluation.classifier import build_classifier, to_model_input, training_recipe
from dp_diffusers.evaluation.samples import grid_path_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine it is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_images(n, *, seed=0, num_classes=10, size=28):
    """Labelled uint8 images [N, H, W, 1]: a bright square whose position encodes the class, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = rng.integers(0, 60, size=(n, size, size, 1)).astype(np.uint8)
    for i, c in enumerate(y):
        r, k = divmod(int(c), 4)
        x[i, 2 + 8 * r : 8 + 8 * r, 2 + 6 * k : 8 + 6 * k] = 255
    return x, y.astype(np.int64)


# ------------------------------------------------------------------------------------------ downstream accuracy
def test_cnn_protocol_reaches_high_accuracy_on_real_mnist_subset(mnist_dir, one_thread):
    train_x, train_y = load_labelled_images(mnist_dir, split="train", max_items=3000)
    test_x, test_y = load_labelled_images(mnist_dir, split="test", max_items=1000)
    assert train_x.shape == (3000, 28, 28, 1) and train_x.dtype == np.uint8 and train_y.dtype == np.int64
    result = downstream_accuracy(
        train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, seeds=(0,), epochs=8, progress=False
    )
    assert result["accuracy_mean"] > 90.0, result
    assert (result["n_train"], result["n_val"], result["n_test"]) == (2750, 250, 1000)
    assert result["classifier"] == "cnn" and result["seeds"] == [0] and result["epochs"] == 8


def test_model_selection_never_touches_the_test_set(monkeypatch, one_thread):
    train_x, train_y = toy_images(240, seed=0)
    test_x, test_y = toy_images(50, seed=1)
    seen = []
    real_accuracy = downstream_module.accuracy

    def spy(model, x, y, **kw):
        seen.append(len(x))
        return real_accuracy(model, x, y, **kw)

    monkeypatch.setattr(downstream_module, "accuracy", spy)
    result = downstream_accuracy(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        seeds=(0, 1),
        epochs=3,
        val_fraction=0.25,
        progress=False,
    )
    assert result["n_val"] == 60 and result["n_train"] == 180
    # 3 validation passes (held-out synthetic) per seed, then exactly one test pass per seed with the chosen model.
    assert seen == [60, 60, 60, 50, 60, 60, 60, 50]
    assert len(result["accuracies"]) == 2 and result["accuracy_std"] >= 0.0
    assert all(1 <= e <= 3 for e in result["best_epochs"])


def test_downstream_rejects_mismatched_shapes():
    x, y = toy_images(20)
    with pytest.raises(UserInputError, match="must match"):
        downstream_accuracy(train_x=x, train_y=y, test_x=x[:, :24, :24], test_y=y, seeds=(0,), epochs=1)


# ------------------------------------------------------------------------------------------ DPImageBench classifiers
#: Parameters of DPImageBench's definitions (evaluation/classifier/*.py) as its evaluator builds them for 1x28x28
#: images and 10 classes: ResNet-110, WRN-40-4, ResNeXt-29 8x64d.
DPIB_PARAMETERS = {"dpib_resnet": 1_730_426, "dpib_wrn": 8_948_922, "dpib_resnext": 34_425_546}


@pytest.mark.parametrize("name", DPIB_CLASSIFIERS)
def test_dpib_classifier_maps_mnist_batches_to_logits(name, one_thread):
    model = build_classifier(name, in_channels=1, image_size=28, num_classes=10).eval()
    assert sum(p.numel() for p in model.parameters()) == DPIB_PARAMETERS[name]
    x, _ = toy_images(2)
    with torch.no_grad():
        logits = model(to_model_input(torch.from_numpy(x)))
    assert logits.shape == (2, 10) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_dpib_classifiers_train_with_dpimagebench_settings(monkeypatch, one_thread):
    made = {"adam": [], "step": [], "ema": []}

    def spy(kind, cls):
        class Spy(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made[kind].append(self)

        return Spy

    monkeypatch.setattr(torch.optim, "Adam", spy("adam", torch.optim.Adam))
    monkeypatch.setattr(torch.optim.lr_scheduler, "StepLR", spy("step", torch.optim.lr_scheduler.StepLR))
    monkeypatch.setattr(downstream_module, "EMAModel", spy("ema", downstream_module.EMAModel))
    x, y = toy_images(8)
    for name in DPIB_CLASSIFIERS:
        recipe = training_recipe(name)
        assert (recipe.lr, recipe.weight_decay, recipe.lr_step_epochs, recipe.lr_gamma) == (0.01, 0.0, 20, 0.2)
        assert (recipe.epochs, recipe.batch_size, recipe.ema_decay) == (50, 256, 0.9999)
        model, info = downstream_module.train_classifier(
            x=x[:6],
            y=y[:6],
            num_classes=10,
            classifier=name,
            epochs=1,
            batch_size=3,
            val_x=x[6:],
            val_y=y[6:],
            progress=False,
        )
        (adam,), (step,), (ema,) = (made[k][-1:] for k in ("adam", "step", "ema"))
        group = adam.param_groups[0]
        assert (group["initial_lr"], group["betas"], group["weight_decay"]) == (0.01, (0.9, 0.999), 0.0)
        assert (step.step_size, step.gamma, step.last_epoch) == (20, 0.2, 1)
        assert ema.optimization_step == 2 and ema.decay == 0.9999  # two optimiser steps, each followed by an update
        # The selected (and only) epoch was validated and returned with the averaged weights.
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params, strict=True))
        assert info["best_epoch"] == 1 and not model.training
    assert [len(made[k]) for k in made] == [3, 3, 3]


def test_classifier_ema_counts_updates_as_dpimagebench_and_swaps_weights_in_and_out():
    layer = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    params = list(layer.parameters())
    ema = downstream_module.classifier_ema(params, 0.9999)
    torch.nn.init.ones_(layer.weight)
    ema.step(params)  # update 1: decay min(0.9999, 2 / 11), the average moves 9/11 of the way (not all of it)
    assert ema.shadow_params[0].item() == pytest.approx(9 / 11)
    ema.step(params)  # update 2: decay 3 / 12
    assert ema.shadow_params[0].item() == pytest.approx(9 / 11 + (1 - 9 / 11) * 9 / 12)
    with downstream_module._averaged(ema, params):
        assert layer.weight.item() == pytest.approx(9 / 11 + (1 - 9 / 11) * 9 / 12)
    assert layer.weight.item() == 1.0
    with pytest.raises(UserInputError):
        downstream_module.classifier_ema(params, 1.5)


def test_downstream_accuracy_over_reports_each_classifier_and_their_mean(one_thread):
    x, y = toy_images(120, seed=0)
    test_x, test_y = toy_images(30, seed=1)
    result = downstream_accuracy_over(
        classifiers=("cnn", "resnet"),
        train_x=x,
        train_y=y,
        test_x=test_x,
        test_y=test_y,
        seeds=(0,),
        epochs=1,
        val_fraction=0.25,
        progress=False,
    )
    by = result["accuracy_by_classifier"]
    assert list(by) == ["cnn", "resnet"] == result["classifiers"] == list(result["downstream_by_classifier"])
    assert result["accuracy_mean"] == pytest.approx(np.mean(list(by.values())))
    assert result["accuracy_std"] == pytest.approx(np.std(list(by.values())))
    assert by["cnn"] == result["downstream_by_classifier"]["cnn"]["accuracy_mean"]
    assert (result["n_train"], result["n_val"], result["n_test"], result["epochs"]) == (90, 30, 30, 1)


# ------------------------------------------------------------------------------------------ Fréchet distances
def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_noise():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = compute_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    distances = [
        frechet_distance(*compute_stats(feats + s * rng.normal(size=feats.shape)), mu, sigma)
        for s in (0.1, 0.5, 1.0, 2.0, 4.0)
    ]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances


def test_eigen_fallback_matches_scipy(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 8)), 1.5 * rng.normal(size=(500, 8)) + 0.3
    stats = (*compute_stats(a), *compute_stats(b))
    with_scipy = frechet_distance(*stats)
    monkeypatch.setattr(fid_module, "_scipy_linalg", None)
    assert frechet_distance(*stats) == pytest.approx(with_scipy, rel=1e-6)


def test_fd_classifier_is_zero_on_the_reference_and_cached(tmp_path, one_thread):
    x, y = toy_images(300)
    cache = tmp_path / "cache"
    same = fd_classifier(samples=x, real_x=x, real_y=y, cache_dir=cache, epochs=1, progress=False)
    assert same == pytest.approx(0.0, abs=1e-6)
    (folder,) = (cache / "fd_classifier").iterdir()
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "reference_stats.npz", "config.json"}
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    noisy = np.clip(x.astype(int) + np.random.default_rng(0).integers(-80, 80, x.shape), 0, 255).astype(np.uint8)
    assert fd_classifier(samples=noisy, real_x=x, real_y=y, cache_dir=cache, epochs=1, progress=False) > 1e-3
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained


def test_inception_fid_without_weights_says_why():
    x, _ = toy_images(4)
    fid, reason = inception_fid(samples=x, reference=x, weights_path="/nonexistent/weights-inception.pth")
    assert fid is None and reason.startswith("Inception-v3 weights unavailable offline")


def test_inception_fid_flow_with_a_stand_in_extractor(tmp_path, monkeypatch):
    seen = []

    def extractor(batch):  # stands in for Inception-v3: uint8 [B, 3, H, W] -> features [B, D]
        assert batch.dtype == torch.uint8 and batch.shape[1] == 3  # grayscale repeated to 3 channels
        seen.append(len(batch))
        return batch[:, 0, ::7, ::7].reshape(len(batch), -1).float()

    monkeypatch.setattr(fid_module, "inception_extractor", lambda **kw: (extractor, "stand-in"))
    x, _ = toy_images(64)
    stats = tmp_path / "reference_stats.npz"
    fid, reason = inception_fid(samples=x, reference=x, reference_stats=str(stats), batch_size=16, progress=False)
    assert reason is None and fid == pytest.approx(0.0, abs=1e-6) and stats.is_file()
    seen.clear()
    noisy = np.clip(x.astype(int) + np.random.default_rng(0).integers(-80, 80, x.shape), 0, 255).astype(np.uint8)
    fid, _ = inception_fid(samples=noisy, reference_stats=str(stats), batch_size=16, progress=False)
    assert fid > 1.0 and sum(seen) == 64  # the cached reference statistics were reused


# ------------------------------------------------------------------------------------------ samples format
def test_npz_round_trip_and_bad_files(tmp_path):
    x, y = toy_images(12)
    path = save_npz(tmp_path / "s.npz", x=x, y=y)
    x2, y2 = load_npz(path)
    assert np.array_equal(x2, x) and np.array_equal(y2, y) and y2.dtype == np.int64

    np.savez(tmp_path / "gray.npz", x=x[..., 0], y=y.astype(np.int32))  # [N, H, W] gains C = 1
    assert load_npz(tmp_path / "gray.npz")[0].shape == (12, 28, 28, 1)

    bad = {
        "no_y.npz": {"x": x},
        "lengths.npz": {"x": x, "y": y[:5]},
        "dtype.npz": {"x": x.astype(np.float32) / 255, "y": y},
        "nchw.npz": {"x": x.transpose(0, 3, 1, 2), "y": y},
        "labels.npz": {"x": x, "y": y.astype(np.float64)},
    }
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserInputError):
            load_npz(tmp_path / name)
    (tmp_path / "junk.npz").write_text("not a zip")
    for path in (tmp_path / "junk.npz", tmp_path / "missing.npz"):
        with pytest.raises(UserInputError):
            load_npz(path)


def test_class_grid_layout():
    x, y = toy_images(5)
    y = np.array([0, 0, 1, 1, 1])
    grid = class_grid(x, y, per_class=3)  # one row per class, blank tiles where a class has fewer
    assert grid.size == (3 * x.shape[2], 2 * x.shape[1])  # diffusers.utils.make_image_grid: no padding
    assert np.asarray(grid)[: x.shape[1], 2 * x.shape[2] :].max() == 0  # class 0's third tile is blank
    assert class_grid(np.repeat(x, 3, axis=-1), y, per_class=2).mode == "RGB"


# ------------------------------------------------------------------------------------------ resumable sampling
class Interrupting:
    """Calls ``pipe`` but crashes on call number ``fail_at`` (0-based); counts calls."""

    def __init__(self, pipe, fail_at=None):
        self.pipe, self.fail_at, self.calls = pipe, fail_at, 0

    def __getattr__(self, name):  # components, id2label, ... of the wrapped pipeline
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.pipe(**kwargs)


def test_generation_resumes_to_the_same_samples(tiny_pipe, tmp_path, one_thread):
    kw = dict(num_samples=11, batch_size=3, num_inference_steps=2, seed=3, classes=[0, 1, 2, 3, 4], progress=False)
    reference = generate_samples(Interrupting(tiny_pipe), output_path=str(tmp_path / "full.npz"), **kw)

    out = str(tmp_path / "resumed.npz")
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_samples(Interrupting(tiny_pipe, fail_at=2), output_path=out, **kw)
    assert sorted(p.name for p in Path(out + ".parts").glob("part_*.npz")) == ["part_00000.npz", "part_00001.npz"]
    with pytest.raises(UserInputError, match="other settings"):
        generate_samples(tiny_pipe, output_path=out, **{**kw, "seed": 4})
    other_model = copy.deepcopy(tiny_pipe)
    with torch.no_grad():
        other_model.unet.conv_out.bias.add_(0.1)
    with pytest.raises(UserInputError, match="other settings"):
        generate_samples(other_model, output_path=out, **kw)
    rest = Interrupting(tiny_pipe)
    generate_samples(rest, output_path=out, **kw)
    assert rest.calls == 2  # chunks 2 and 3 only (the last one holds 2 samples)

    x, y = load_npz(out)
    x_ref, y_ref = load_npz(reference)
    assert x.shape == (11, 28, 28, 1) and np.array_equal(x, x_ref) and np.array_equal(y, y_ref)
    assert np.bincount(y).tolist() == [3, 2, 2, 2, 2]
    assert Path(grid_path_for(out)).is_file() and not Path(out + ".parts").exists()
    again = Interrupting(tiny_pipe)
    generate_samples(again, output_path=out, **kw)  # already complete: nothing to do
    assert again.calls == 0


def test_generation_uses_pipeline_classes_by_default(tiny_pipe, tmp_path, one_thread):
    out = generate_samples(tiny_pipe, num_samples=10, output_path=str(tmp_path / "s.npz"), num_inference_steps=1)
    assert sorted(load_npz(out)[1].tolist()) == list(range(10))


# ------------------------------------------------------------------------------------------ report and CLI
def test_report_lists_metrics_and_privacy(tmp_path):
    grid = tmp_path / "g.png"
    class_grid(*toy_images(4), per_class=2).save(grid)
    metrics = {
        "accuracy_mean": 97.5,
        "accuracy_std": 0.2,
        "accuracies": [97.3, 97.7],
        "seeds": [0, 1],
        "classifier": "cnn",
        "n_train": 55000,
        "n_val": 5000,
        "n_test": 10000,
        "fid_inception": None,
        "fid_inception_unavailable_reason": "Inception-v3 weights unavailable offline: no weights",
        "fd_classifier": 1.25,
    }
    path = write_report(
        output_dir=tmp_path / "out", metrics=metrics, privacy={"epsilon": 10.0, "delta": 1e-5}, grid_path=str(grid)
    )
    text = Path(path).read_text()
    assert "97.50 ± 0.20 %" in text and "fd_classifier" in text and "unavailable offline" in text
    assert "(10, 1e-05)-differentially private" in text and (tmp_path / "out" / "g.png").is_file()


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "evaluate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_evaluate_cli_end_to_end(tmp_path):
    x, y = toy_images(200, seed=0)
    save_npz(tmp_path / "samples.npz", x=x, y=y)
    save_npz(tmp_path / "test.npz", **dict(zip("xy", toy_images(50, seed=1), strict=True)))
    save_npz(tmp_path / "train.npz", **dict(zip("xy", toy_images(100, seed=2), strict=True)))
    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 2.3}))
    out = tmp_path / "eval"
    common = ["--samples", tmp_path / "samples.npz", "--real_test", tmp_path / "test.npz", "--num_threads", "1"]
    proc = run_cli(
        *common,
        *("--real_train", tmp_path / "train.npz", "--output_dir", out, "--epochs", "1", "--seeds", "0", "1"),
        *("--privacy_json", tmp_path / "privacy.json", "--cache_dir", tmp_path / "cache", "--fd_epochs", "1"),
        "--no_progress",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_mean", "accuracy_std", "n_train", "n_test", "classifier", "seeds", "fid_inception"):
        assert key in metrics
    assert metrics["n_test"] == 50 and metrics["seeds"] == [0, 1] and metrics["classifier"] == "cnn"
    assert metrics["fid_inception"] is not None or metrics["fid_inception_unavailable_reason"]
    assert metrics["fd_classifier"] >= 0.0 and metrics["epsilon"] == 1.0
    assert (out / "report.md").is_file() and (out / "samples_grid.png").is_file()
    assert "sampling_seconds" not in metrics  # nothing was drawn: --samples


def test_evaluate_draws_from_a_pipeline_and_times_the_sampling(tiny_pipe, tmp_path, one_thread):
    import runpy

    tiny_pipe.save_pretrained(tmp_path / "pipe")
    size = tiny_pipe.vae.config.sample_size
    save_npz(tmp_path / "test.npz", **dict(zip("xy", toy_images(20, seed=1, size=size), strict=True)))
    script = runpy.run_path(str(REPO / "examples" / "evaluate.py"))
    args = ["--pipeline", str(tmp_path / "pipe"), "--num_samples", "20", "--num_inference_steps", "2"]
    args += ["--real_test", str(tmp_path / "test.npz"), "--skip_fd", "--seeds", "0", "--epochs", "1"]
    out = tmp_path / "eval"
    metrics = script["main"](script["parse_args"]([*args, "--output_dir", str(out), "--no_progress"]))
    assert metrics["num_samples"] == 20 and np.load(out / "samples.npz")["x"].shape[0] == 20
    assert 0.0 < metrics["sampling_seconds"] <= metrics["seconds"]
    assert json.loads((out / "metrics.json").read_text())["sampling_seconds"] == metrics["sampling_seconds"]


def test_evaluate_cli_dpib_reports_each_classifier_and_their_mean(tmp_path, monkeypatch, one_thread):
    import runpy

    save_npz(tmp_path / "samples.npz", **dict(zip("xy", toy_images(60, seed=0), strict=True)))
    save_npz(tmp_path / "test.npz", **dict(zip("xy", toy_images(20, seed=1), strict=True)))
    script = runpy.run_path(str(REPO / "examples" / "evaluate.py"))
    # Two small classifiers stand in for DPImageBench's three (hours per epoch on a CPU); the wiring is the same.
    monkeypatch.setitem(script["main"].__globals__, "DPIB_CLASSIFIERS", ("cnn", "resnet"))
    common = ["--samples", str(tmp_path / "samples.npz"), "--real_test", str(tmp_path / "test.npz"), "--skip_fd"]
    common += ["--seeds", "0", "--epochs", "1", "--no_progress"]
    assert script["parse_args"]([*common, "--output_dir", "o", "--classifier", "dpib_wrn"]).classifier == "dpib_wrn"
    out = tmp_path / "eval"
    metrics = script["main"](script["parse_args"]([*common, "--output_dir", str(out), "--classifier", "dpib"]))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["classifier"] == "dpib" and list(saved["accuracy_by_classifier"]) == ["cnn", "resnet"]
    assert saved["accuracy_mean"] == pytest.approx(np.mean(list(saved["accuracy_by_classifier"].values())))
    assert saved["downstream_by_classifier"]["resnet"]["seeds"] == [0] and metrics["n_test"] == 20
    report = (out / "report.md").read_text()
    assert "Downstream accuracy (resnet)" in report and "mean ± std over cnn, resnet" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "{tmp}/missing.npz", "--real_test", "{tmp}/t.npz"], "No such samples file"),
        (["--real_test", "{tmp}/t.npz"], "--pipeline"),
        (["--samples", "{tmp}/t.npz", "--real_test", "{tmp}/t.npz", "--max_train", "1"], "--max_train"),
        (["--samples", "{tmp}/t.npz", "--real_test", "{tmp}/t.npz", "--privacy_json", "{tmp}/p.json"], "privacy"),
        (["--pipeline", "{tmp}/no-model", "--real_test", "{tmp}/t.npz"], "no model_index.json there"),
        (["--pipeline", "{tmp}/corrupt", "--real_test", "{tmp}/t.npz"], "Could not load a DPLDMPipeline"),
    ],
)
def test_evaluate_cli_bad_input_is_one_line(tmp_path, capsys, request, args, message):
    import runpy

    save_npz(tmp_path / "t.npz", **dict(zip("xy", toy_images(10), strict=True)))
    if "{tmp}/corrupt" in args:
        pipe = request.getfixturevalue("tiny_pipe")
        pipe.save_pretrained(tmp_path / "corrupt")
        (tmp_path / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    cli = runpy.run_path(str(REPO / "examples" / "evaluate.py"))["cli"]
    argv = [a.format(tmp=tmp_path) for a in args] + ["--output_dir", str(tmp_path / "out"), "--no_progress"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
