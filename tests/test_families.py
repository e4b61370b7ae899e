"""Every model family end to end on a tiny random model (CPU, offline): ``train_dp_ldm.py`` runs 2 DP steps from a
local pipeline folder; only the selected weights change (bit for bit elsewhere); privacy.json and the card say
what ran; the family's own diffusers pipeline loads and samples the output. Per-example gradients of the engine
equal a one-example-at-a-time loop for the text-conditional (with its text encoder) and DiT families. Public base
presets and the refusal of bases pre-trained on the private data are checked offline."""

from __future__ import annotations

import copy
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dp_diffusers.errors import UserInputError
from dp_diffusers.privacy import format_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dp_ldm.py"
# 16 RGB images (2 classes), logical batch 8 (q = 0.5), 2 steps at sigma 1; raw weights saved (no EMA).
RUN = [
    "--train_batch_size", "8", "--max_physical_batch_size", "4", "--max_train_steps", "2",
    "--noise_multiplier", "1.0", "--epsilon", "50", "--ema_decay", "0", "--checkpointing_steps", "0",
    "--num_validation_images", "1", "--num_inference_steps", "2", "--report_to", "none",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("data") / "rgb"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB").save(
                folder / cls / f"{i}.png"
            )
    return folder


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    from dp_diffusers.models.tiny import build_tiny_dit, build_tiny_ldm, build_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("bases")
    builders = {"sd": build_tiny_stable_diffusion, "dit": build_tiny_dit, "ldm": build_tiny_ldm}
    for name, build in builders.items():
        build().save_pretrained(root / name)
    return {name: root / name for name in builders}


def train(script, base: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["--pretrained_model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(out)]
    script.main(script.parse_args([*argv, *RUN, *extra]))
    return out


def privacy_of(out: Path) -> dict:
    return json.loads((out / "privacy.json").read_text())


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no weights in {folder / component}"
    found = {}
    for f in files:
        found.update(load_file(f))
    return found


def changed_keys(base: Path, out: Path, component: str) -> tuple[set[str], dict, dict]:
    before, after = weights(base, component), weights(out, component)
    assert before.keys() == after.keys(), component
    return {k for k in before if not torch.equal(before[k], after[k])}, before, after


def under(key: str, modules: list[str]) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def run_main_block(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    old = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sd_run(script, bases, rgb_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd") / "out"
    return train(script, bases["sd"], rgb_folder, out, "--train_text_encoder", "--prompt_template", "a {label} photo")


@pytest.fixture(scope="module")
def dit_run(script, bases, rgb_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dit") / "out"
    return train(script, bases["dit"], rgb_folder, out, "--label_map", "0:3,1:7")


@pytest.fixture(scope="module")
def ldm_run(script, bases, rgb_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ldm") / "out"
    return train(script, bases["ldm"], rgb_folder, out)


def assert_privacy_and_card(out: Path, base: Path, family: str, usage: str) -> dict:
    from huggingface_hub import ModelCard

    privacy = privacy_of(out)
    assert privacy["family"] == family and privacy["private"] is True
    assert privacy["steps"] == 2 and privacy["dataset_size"] == 16 and privacy["sample_rate"] == 0.5
    assert 0 < privacy["epsilon"] <= 50 and privacy["noise_multiplier"] == 1.0
    assert privacy["base_model"] == str(base)
    assert privacy["base_model_pretraining_data"]
    assert privacy["trained_parameters_kind"].startswith("full weights of the attention blocks")
    assert 0 < privacy["trainable_parameters"] < privacy["total_parameters"]
    card = ModelCard.load(out / "README.md")
    text = " ".join(card.text.split())
    # A local base is named by its folder, never by an absolute path of the machine that trained it.
    assert f"a local folder, `{Path(base).name}`, pre-trained on {privacy['base_model_pretraining_data']}" in text
    assert str(base) not in text and card.data.to_dict().get("base_model") is None
    assert f"({format_epsilon(privacy['epsilon'])}, {format_epsilon(privacy['delta'], digits=3)})-DP" in card.text
    assert usage in card.text and "DPLDMPipeline" not in card.text
    assert privacy["trained_parameters_kind"] in card.text
    return privacy


def test_text_conditional_trains_unet_attention_and_text_encoder_only(sd_run, bases):
    from diffusers import StableDiffusionPipeline

    base, out = bases["sd"], sd_run
    privacy = assert_privacy_and_card(out, base, "text-conditional-ldm", "StableDiffusionPipeline.from_pretrained")
    modules = privacy["trained_modules"]
    assert modules[-1] == "embedder" and len(modules) == 8  # 7 Transformer2DModel blocks + the text encoder
    assert privacy["prompts"] == "template 'a {label} photo' with the label names"
    assert privacy["text_encoder"].startswith("trained")
    changed, before, _ = changed_keys(base, out, "unet")
    trained = {k for k in before if under(k, modules[:-1])}
    assert changed == trained
    te_changed, te_before, _ = changed_keys(base, out, "text_encoder")
    te_trained = {k for k in te_before if "position_embedding" not in k}
    assert te_changed == te_trained  # all of CLIP but its (per-batch, not per-example) position embedding
    assert changed_keys(base, out, "vae")[0] == set()
    count = sum(before[k].numel() for k in trained) + sum(te_before[k].numel() for k in te_trained)
    assert count == privacy["trainable_parameters"]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat photo", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_dit_trains_attention_and_the_mapped_label_rows_only(dit_run, bases):
    from diffusers import DiTPipeline

    base, out = bases["dit"], dit_run
    privacy = assert_privacy_and_card(out, base, "dit", "DiTPipeline.from_pretrained")
    assert privacy["trained_modules"] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1", "embedder"]
    assert privacy["label_map"] == {"0": 3, "1": 7}
    changed, before, after = changed_keys(base, out, "transformer")
    tables = {k for k in before if k.endswith("norm1.emb.class_embedder.embedding_table.weight")}
    attention = {k for k in before if ".attn1." in k}
    assert len(tables) == 2 and changed == attention | tables
    rows = torch.tensor([3, 7, 1000])  # the mapped classes and the null class, in every block's (tied) table
    others = torch.ones(1001, dtype=torch.bool)
    others[rows] = False
    first = after[sorted(tables)[0]]
    for key in tables:
        assert torch.equal(after[key][others], before[key][others])
        assert not (after[key][rows] == before[key][rows]).all(dim=1).any()
        assert torch.equal(after[key], first)  # the copies stay identical, as in a converted DiT checkpoint
    width = first.shape[1]
    assert privacy["trainable_parameters"] == sum(before[k].numel() for k in attention) + 3 * width
    assert changed_keys(base, out, "vae")[0] == set()
    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["cat", "dog"]) == [3, 7]
    # Guidance works: the null class is still id 1000.
    image = pipe(class_labels=[3], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_unconditional_trains_self_attention_only(ldm_run, bases):
    from diffusers import LDMPipeline

    base, out = bases["ldm"], ldm_run
    privacy = assert_privacy_and_card(out, base, "unconditional-ldm", "LDMPipeline.from_pretrained")
    modules = privacy["trained_modules"]
    assert "embedder" not in modules and len(modules) == 4 and all(".attentions." in m for m in modules)
    changed, before, _ = changed_keys(base, out, "unet")
    assert changed == {k for k in before if under(k, modules)}
    assert sum(before[k].numel() for k in changed) == privacy["trainable_parameters"]
    assert changed_keys(base, out, "vqvae")[0] == set()
    pipe = LDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_dit_trains_with_ghost_clipping(script, bases, rgb_folder, tmp_path):
    """The label table runs once per forward (no parameter tying), so Opacus' ghost clipping accepts it."""
    out = train(script, bases["dit"], rgb_folder, tmp_path / "out", "--grad_sample_mode", "ghost")
    privacy = privacy_of(out)
    assert privacy["grad_sample_mode"] == "ghost" and privacy["steps"] == 2
    changed, before, _ = changed_keys(bases["dit"], out, "transformer")
    assert {k for k in changed if ".attn1." in k} == {k for k in before if ".attn1." in k}


# ---------------------------------------------------------------------------------------------------- per-example


def engine_vs_loop(model, dataset, randomness, *, expect_bookkeeping: bool = False) -> None:
    """The engine's per-sample gradients of ``model`` on ``dataset`` (all N examples in one batch, q = 1) equal the
    gradients of each example's loss alone, with the same latent sample, timestep, noise and dropout."""
    from torch.utils.data import DataLoader

    from dp_diffusers.privacy import DPEngine, PrivacyConfig

    reference = copy.deepcopy(model)
    bookkeeping_model = copy.deepcopy(model)
    n = len(dataset)
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1e6, accountant="rdp", expected_batch_size=n,
        max_steps=1, epochs=None, grad_sample_mode="hooks",
    )  # fmt: skip
    engine = DPEngine(config=cfg, dataset_size=n)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=n), seed=0
    )
    batches = engine.physical_batches(loader)
    batch = next(batches)
    assert len(batch[0]) == n  # q = 1: every example
    engine.backward(module(*batch, **randomness))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    got = {name: p.grad_sample for name, p in model.named_parameters() if p.requires_grad}
    ref_params = dict(reference.named_parameters())
    assert len(names) > 10
    flat = torch.cat([got[name].flatten(1) for name in names], dim=1)
    assert (flat.norm(dim=1) > 0).all() and not torch.allclose(flat[0], flat[1])  # real, distinct per example
    loop = []
    for i in range(n):
        rows = [t[i : i + 1] for t in batch]
        loss = reference(*rows, **{k: v[i : i + 1] for k, v in randomness.items()}).sum()
        grads = torch.autograd.grad(loss, [ref_params[name] for name in names])
        loop.append(grads)
        for name, g in zip(names, grads, strict=True):
            assert got[name].shape[0] == n, name
            torch.testing.assert_close(got[name][i], g, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    batches.close()
    bookkeeping_step_matches_loop(bookkeeping_model, dataset, randomness, names, loop, expect_bookkeeping)


def bookkeeping_step_matches_loop(model, dataset, randomness, names, loop, expect_bookkeeping) -> None:
    """grad_sample_mode="bookkeeping" (the default; no per-sample gradient tensors for linear weights): one
    noiseless SGD step (lr 1) equals ``-(1/n) sum_i c_i g_i`` from the loop's per-example gradients ``g_i``, with
    ``c_i = min(1, C / ||g_i||)`` and C between the examples' norms (some clipped, some not)."""
    from torch.utils.data import DataLoader

    from dp_diffusers.privacy import DPEngine, PrivacyConfig

    n = len(dataset)
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in loop])
    c = norms.median().item()
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=0.0, max_grad_norm=c, accountant="rdp", expected_batch_size=n,
        max_steps=1, epochs=None,
    )  # fmt: skip
    assert cfg.grad_sample_mode == "bookkeeping"
    engine = DPEngine(config=cfg, dataset_size=n)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=n), seed=0
    )
    for batch in engine.physical_batches(loader):
        engine.backward(module(*batch, **randomness))
        bookkept = [p for p in optimizer.params if p.dim() == 2 and p.grad_sample.dim() == 1]
        # linear weights with few positions carry per-example squared norms [n], not [n, out, in] gradients
        assert bool(bookkept) == expect_bookkeeping
        assert engine.step()
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    params = dict(model.named_parameters())
    for j, name in enumerate(names):
        expected = before[name] - sum(factors[i] * loop[i][j] for i in range(n)) / n
        torch.testing.assert_close(
            params[name], expected, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def randomness(n: int, latent_shape, *, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_noise": torch.randn(n, *latent_shape, generator=g),
        "timesteps": torch.randint(0, 1000, (n,), generator=g),
        "noise": torch.randn(n, *latent_shape, generator=g),
        "drop": torch.tensor([i % 3 == 0 for i in range(n)]),  # some rows lose their conditioning
    }


def test_class_conditional_per_example_gradients_match_a_loop(tiny_parts):
    """Ours (TINY): cross-attention keys/values on 4 class tokens and the coarse level's feed-forward layers take
    book-keeping in the default mode; the clipped step still equals the loop's."""
    from torch.utils.data import TensorDataset

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.families import ClassConditionalLDM
    from dp_diffusers.trainable import select_trainable

    family = ClassConditionalLDM(DPLDMPipeline(**tiny_parts))
    select_trainable(family.unet, embedder=family.embedder)
    model = family.loss_module(cond_drop_prob=0.0).train()
    n = 4
    shape = (family.vae.config.latent_channels, 7, 7)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, *shape, generator=g), torch.rand(n, *shape, generator=g) * 0.1, torch.tensor([0, 3, 3, 9])
    )
    engine_vs_loop(model, data, randomness(n, shape), expect_bookkeeping=True)


def test_text_conditional_per_example_gradients_match_a_loop():
    from torch.utils.data import TensorDataset

    from dp_diffusers.families import FamilyOptions, TextConditionalLDM
    from dp_diffusers.models.tiny import build_tiny_stable_diffusion
    from dp_diffusers.trainable import TrainableConfig, select_trainable

    family = TextConditionalLDM(build_tiny_stable_diffusion())
    family.configure(FamilyOptions(train_text_encoder=True))
    report = select_trainable(
        family.denoiser, config=TrainableConfig(attention_layers="6-7"), embedder=family.embedder
    )
    assert report.modules[-1] == "embedder"
    model = family.loss_module(cond_drop_prob=0.0).train()
    n, shape = 4, (2, 8, 8)
    g = torch.Generator().manual_seed(0)
    ids = family.tokenize(["a photo of a cat", "a dog", "zebra stripes", "x"])
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.rand(n, *shape, generator=g) * 0.1, ids)
    engine_vs_loop(model, data, randomness(n, shape))


def test_dit_per_example_gradients_match_a_loop():
    from torch.utils.data import TensorDataset

    from dp_diffusers.families import DiTFamily
    from dp_diffusers.models.tiny import build_tiny_dit
    from dp_diffusers.trainable import TrainableConfig, select_trainable

    family = DiTFamily(build_tiny_dit())
    family.adopt_labels({0: "a", 1: "b", 2: "c"})
    select_trainable(
        family.denoiser,
        config=TrainableConfig(),
        embedder=family.embedder,
        block_classes=family.attention_block_classes,
    )
    model = family.loss_module(cond_drop_prob=0.0).train()
    n, shape = 4, (2, 8, 8)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1])
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.rand(n, *shape, generator=g) * 0.1, labels)
    engine_vs_loop(model, data, randomness(n, shape))


@pytest.mark.parametrize("kind", ["ours", "dit"])
def test_dropped_rows_are_conditioned_on_the_null_class(kind):
    """Label dropout (classifier-free guidance training) replaces exactly the dropped rows by the null class."""
    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.families import ClassConditionalLDM, DiTFamily
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm
    from dp_diffusers.models.tiny import build_tiny_dit

    if kind == "dit":
        family = DiTFamily(build_tiny_dit())
        family.adopt_labels({0: "a", 1: "b", 2: "c"})
        shape = (2, 8, 8)
    else:
        torch.manual_seed(0)
        family = ClassConditionalLDM(DPLDMPipeline(**build_class_conditional_ldm(TINY)))
        shape = (2, 7, 7)
    model = family.loss_module(cond_drop_prob=0.5).eval()
    n = 4
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(n, *shape, generator=g), torch.rand(n, *shape, generator=g) * 0.1
    labels = torch.tensor([0, 1, 2, 1])
    fixed = {k: v for k, v in randomness(n, shape).items() if k != "drop"}
    drop = torch.tensor([True, False, True, False])
    null = torch.where(drop, torch.full_like(labels, model.embedder.null_class_id), labels)
    with torch.no_grad():
        dropped = model(mean, std, labels, drop=drop, **fixed)
        by_hand = model(mean, std, null, drop=torch.zeros(n, dtype=torch.bool), **fixed)
        kept = model(mean, std, labels, drop=torch.zeros(n, dtype=torch.bool), **fixed)
    torch.testing.assert_close(dropped, by_hand)
    assert not torch.allclose(dropped[drop], kept[drop]) and torch.allclose(dropped[~drop], kept[~drop])


# ---------------------------------------------------------------------------------------------------- options


def test_captions_become_the_prompts(bases, tmp_path):
    import datasets
    from PIL import Image

    from dp_diffusers.data import as_torch_dataset, load_image_dataset
    from dp_diffusers.families import FamilyOptions, load_family

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    captions = ["a red square", "two cats", "an empty room"]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": captions}, features=features).to_parquet(
        tmp_path / "c.parquet"
    )
    family = load_family(str(bases["sd"]), options=FamilyOptions(caption_column="text"))
    assert not family.needs_labels
    loaded = load_image_dataset(str(tmp_path / "c.parquet"))
    family.prepare_data(loaded)
    encoded = family.encode(as_torch_dataset(loaded, resolution=32, channels=3), progress=False)
    assert torch.equal(encoded.tensors[2], family.tokenize(captions))
    assert family.grid_prompts() == [""]  # a private caption never reaches the sample grid


def test_options_of_another_family_are_refused(bases):
    from dp_diffusers.families import FamilyOptions, load_family, parse_label_map

    with pytest.raises(UserInputError, match="`label_map` does not apply to a text-conditional-ldm"):
        load_family(str(bases["sd"]), options=FamilyOptions(label_map={0: 1}))
    with pytest.raises(UserInputError, match="`caption_column`, `train_text_encoder` does not apply to a dit"):
        load_family(str(bases["dit"]), options=FamilyOptions(caption_column="c", train_text_encoder=True))
    assert parse_label_map("0:207, 1:360") == {0: 207, 1: 360}
    for bad in ("0-207", "0:1,0:2", "a:b"):
        with pytest.raises(UserInputError, match="`label_map`"):
            parse_label_map(bad)
    dit = load_family(str(bases["dit"]), options=FamilyOptions(label_map={0: 5, 1: 5}))
    with pytest.raises(UserInputError, match="distinct class ids"):
        dit.adopt_labels({0: "a", 1: "b"})
    dit = load_family(str(bases["dit"]), options=FamilyOptions(label_map={0: 5}))
    with pytest.raises(UserInputError, match="every private label id 0..1"):
        dit.adopt_labels({0: "a", 1: "b"})


def test_dit_default_labels_start_from_the_mean_class_row(bases):
    from dp_diffusers.families import load_family

    family = load_family(str(bases["dit"]))
    table = family.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.detach().clone()
    family.adopt_labels({0: "a", 1: "b"})
    rows = family.embedder.embedding_table.weight
    torch.testing.assert_close(rows[:2], table[:1000].mean(0).expand(2, -1))
    assert torch.equal(rows[2], table[1000]) and family.label_map == {0: 0, 1: 1}


def test_unknown_pipeline_is_a_one_line_error_listing_the_families(bases, tmp_path, capsys):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    argv = ["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"), *RUN]
    assert_one_line_error(
        *run_main_block(argv, capsys),
        "is a DDPMPipeline, which is not supported",
        "StableDiffusionPipeline",
        "DiTPipeline",
        "LDMPipeline",
        "DPLDMPipeline",
    )


# ---------------------------------------------------------------------------------------------------- presets


def test_presets_recommend_public_bases_that_never_saw_the_data(script):
    from dp_diffusers import DEFAULT_PUBLIC_MODEL, GENERAL_PUBLIC_MODEL
    from dp_diffusers.families import RECOMMENDED_BASES, check_base_model, known_base

    assert {"digits", "mnist", "fashion_mnist", "cifar10", "celeba"} <= RECOMMENDED_BASES.keys()
    for name in ("digits", "mnist"):
        assert script.parse_args(["--dataset_name", name]).pretrained_model_name_or_path == DEFAULT_PUBLIC_MODEL
    fashion = script.parse_args(["--dataset_name", "fashion_mnist"])
    assert fashion.pretrained_model_name_or_path == GENERAL_PUBLIC_MODEL  # far from digits: the general prior
    celeba = script.parse_args(["--dataset_name", "celeba"])
    assert celeba.pretrained_model_name_or_path == "facebook/DiT-XL-2-256" and celeba.label_map is None
    cifar = script.parse_args(["--dataset_name", "cifar10"])
    assert cifar.pretrained_model_name_or_path == "facebook/DiT-XL-2-256"
    assert cifar.label_map == RECOMMENDED_BASES["cifar10"].label_map  # airplane -> 404 airliner, ...
    assert cifar.label_map.startswith("0:404,") and cifar.label_map.count(":") == 10
    given = script.parse_args(["--dataset_name", "cifar10", "--pretrained_model_name_or_path", "x/y"])
    assert given.pretrained_model_name_or_path == "x/y" and given.label_map is None
    assert script.parse_args(["--dataset_name", "/some/folder"]).pretrained_model_name_or_path == DEFAULT_PUBLIC_MODEL
    for preset, recommendation in RECOMMENDED_BASES.items():
        check_base_model(recommendation.model, preset)  # never refused
        assert known_base(recommendation.model) is not None  # and its pre-training data is known (for the card)
    assert "ImageNet" in known_base("facebook/DiT-XL-2-256").pretraining_data
    assert "drawn digits" in known_base(DEFAULT_PUBLIC_MODEL).pretraining_data
    assert known_base(DEFAULT_PUBLIC_MODEL).data_keys == frozenset({"drawn_digits", "printed_digits"})


@pytest.mark.parametrize(
    ("base", "data", "needle"),
    [
        ("CompVis/ldm-celebahq-256", "celeba", "CelebA-HQ"),
        ("CompVis/ldm-celebahq-256", "flwrlabs/celeba", "CelebA-HQ"),
        ("google/ddpm-cifar10-32", "cifar10", "CIFAR-10"),
        ("google/ddpm-cifar10-32", "uoft-cs/cifar10", "CIFAR-10"),
        ("facebook/DiT-XL-2-256", "imagenet-1k", "ImageNet"),
    ],
)
def test_a_base_trained_on_the_private_data_is_refused_offline(base, data, needle, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", base, "--dataset_name", data, "--output_dir", str(tmp_path / "o")]
    assert_one_line_error(*run_main_block([*argv, *RUN], capsys), needle, "never saw")
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_a_local_base_pretrained_on_the_private_data_is_refused(tmp_path):
    from dp_diffusers.families import check_base_model

    (tmp_path / "pretraining.json").write_text(json.dumps({"public_data": "ylecun/mnist (train)"}))
    with pytest.raises(UserInputError, match="ylecun/mnist"):
        check_base_model(str(tmp_path), "mnist")
    check_base_model(str(tmp_path), "fashion_mnist")  # another data set: fine
    from dp_diffusers.families import resolve_base_model

    for public in ("printed_digits", "drawn_digits"):  # the shipped digit model's own pre-training data
        with pytest.raises(UserInputError, match=f"{public} is the public pre-training data"):
            resolve_base_model(None, public)


def test_a_hub_base_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    """A prior published on the Hub keeps its pre-training data and its fine-tuning recommendation once downloaded
    (pretraining.json in the Hub cache); a base never downloaded gets the paper's defaults, with no network call."""
    from huggingface_hub import constants

    from dp_diffusers.families import FineTuneDefaults, check_base_model, fine_tune_defaults, known_base
    from dp_diffusers.families.presets import PAPER_FINE_TUNE

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--their-prior"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    recommended = {"trainable_scope": "full", "learning_rate": 5e-4}
    info = {"public_data": "ylecun/mnist (train)", "fine_tune_defaults": recommended}
    (snapshot / "pretraining.json").write_text(json.dumps(info))
    assert fine_tune_defaults("someone/their-prior") == FineTuneDefaults("full", 5e-4)
    with pytest.raises(UserInputError, match="ylecun/mnist"):  # and it saw MNIST: refused for private MNIST
        check_base_model("someone/their-prior", "mnist")
    assert fine_tune_defaults("someone/never-downloaded") == PAPER_FINE_TUNE
    assert known_base("someone/never-downloaded") is None
