"""LoRA on the attention projections, trained with DP-SGD through the same engine (CPU, offline, tiny models).

Guards opacus#820 (adapters that never update while epsilon accrues): the adapters move, every base weight stays
bit-identical. The output loads the diffusers way (``pipe.load_lora_weights``) for DPLDMPipeline and
StableDiffusionPipeline; DiT (no LoRA loader in diffusers) is saved merged, with the adapters beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_families import RUN, bases, engine_vs_loop, randomness, rgb_folder  # noqa: F401 (fixtures)

from dp_diffusers.errors import UserInputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LORA = ["--use_lora", "--lora_rank", "2"]


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(folder / component / "diffusion_pytorch_model.safetensors")


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cc_base(tmp_path_factory) -> Path:
    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cc") / "base"
    DPLDMPipeline(**build_class_conditional_ldm(TINY, id2label={i: str(i) for i in range(10)})).save_pretrained(path)
    return path


def train(script, base: Path, data: Path, out: Path, *extra: str) -> Path:  # noqa: F811
    argv = ["--pretrained_model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(out)]
    script.main(script.parse_args([*argv, *RUN, *LORA, *extra]))
    return out


def test_class_conditional_lora_loads_with_load_lora_weights(script, cc_base, rgb_folder, tmp_path):  # noqa: F811
    from dp_diffusers import DPLDMPipeline

    out = train(script, cc_base, rgb_folder, tmp_path / "out")
    privacy = json.loads((out / "privacy.json").read_text())
    assert (
        privacy["trained_parameters_kind"]
        == "LoRA adapters (rank 2) on the attention projections + the embedder (full)"
    )
    assert privacy["lora"]["format"] == "diffusers" and privacy["lora"]["rank"] == 2
    assert privacy["trained_modules"][-1] == "embedder" and privacy["trained_modules"][0].endswith(".to_q")
    assert identical(weights(cc_base, "unet"), weights(out, "unet"))  # the base UNet, bit for bit
    assert identical(weights(cc_base, "vae"), weights(out, "vae"))
    before, after = weights(cc_base, "embedder"), weights(out, "embedder")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the embedder trained fully
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(saved) == 2 * 4 * 2 * 7  # A and B x q/k/v/out x (attn1, attn2) x 7 blocks
    assert all(v.abs().sum() > 0 for v in saved.values())  # lora_B starts at zero: it moved
    assert "pipe.load_lora_weights(" in (out / "README.md").read_text()
    lora_params = sum(v.numel() for v in saved.values())
    assert privacy["trainable_parameters"] == lora_params + sum(v.numel() for v in after.values())

    pipe = DPLDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        g = torch.Generator().manual_seed(0)
        return pipe(class_labels=[0, 1], num_inference_steps=2, generator=g, output_type="np").images

    without = sample()
    pipe.load_lora_weights(out)
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)
    down = {k.replace("unet.", "", 1).replace(".lora.down.", ".lora_A.default_0."): v for k, v in saved.items()}
    up = {k.replace(".lora.up.", ".lora_B.default_0."): v for k, v in down.items()}
    assert all(torch.equal(loaded[k], v) for k, v in up.items() if k in loaded) and up.keys() == loaded.keys()
    assert not np.array_equal(without, sample())  # the adapters change the model


def test_stable_diffusion_lora_loads_with_load_lora_weights(script, bases, rgb_folder, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    out = train(script, bases["sd"], rgb_folder, tmp_path / "out")
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["trained_parameters_kind"] == "LoRA adapters (rank 2) on the attention projections"
    for component in ("unet", "vae"):
        assert identical(weights(bases["sd"], component), weights(out, component)), component
    te = "text_encoder/model.safetensors"
    assert identical(load_file(bases["sd"] / te), load_file(out / te))  # not trained without --train_text_encoder
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    assert sum(".lora_B." in k for k in pipe.unet.state_dict()) == 4 * 2 * 7
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert np.isfinite(image).all()


def test_dit_lora_is_saved_merged_with_the_adapters_beside(script, bases, rgb_folder, tmp_path):  # noqa: F811
    from diffusers import DiTPipeline

    out = train(script, bases["dit"], rgb_folder, tmp_path / "out")
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["lora"]["format"] == "merged"
    adapters = load_file(out / "dp_lora_adapter.safetensors")
    before, after = weights(bases["dit"], "transformer"), weights(out, "transformer")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projections = {
        f"transformer_blocks.{b}.attn1.{p}.weight" for b in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    tables = {f"transformer_blocks.{b}.norm1.emb.class_embedder.embedding_table.weight" for b in (0, 1)}
    assert changed == projections | tables  # merged projection weights (biases untouched) + the label rows
    for key in projections:
        module = key.removesuffix(".weight")
        delta = adapters[f"{module}.lora_B.weight"] @ adapters[f"{module}.lora_A.weight"]  # scale alpha / r = 1
        torch.testing.assert_close(after[key], before[key] + delta)
    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe(class_labels=[0], num_inference_steps=2, output_type="np").images).all()


def test_adapters_update_under_dp_and_base_weights_do_not():
    """opacus#820: adapters that never update while epsilon accrues. Two DP steps: every adapter tensor moves,
    every base tensor of the UNet is bit-identical, and epsilon was spent."""
    from torch.utils.data import DataLoader, TensorDataset

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.families import ClassConditionalLDM
    from dp_diffusers.models.configs import TINY, build_class_conditional_ldm
    from dp_diffusers.privacy import DPEngine, PrivacyConfig
    from dp_diffusers.trainable import TrainableConfig, select_trainable

    torch.manual_seed(0)
    family = ClassConditionalLDM(DPLDMPipeline(**build_class_conditional_ldm(TINY)))
    config = TrainableConfig(use_lora=True, lora_rank=2, train_embedder=False)
    report = select_trainable(family.denoiser, config=config, embedder=family.embedder)
    assert "embedder" not in report.modules
    model = family.loss_module().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    n = 16
    data = TensorDataset(torch.randn(n, 2, 7, 7), torch.rand(n, 2, 7, 7) * 0.1, torch.arange(n) % 10)
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", expected_batch_size=8, max_steps=2
    )
    engine = DPEngine(config=cfg, dataset_size=n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    module, _, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=8), seed=0
    )
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            engine.backward(module(*batch))
            engine.step()
    assert engine.steps == 2 and engine.epsilon > 0
    for name, p in model.named_parameters():
        if name in trained:
            assert p.device == before[name].device and not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_lora_per_example_gradients_match_a_loop():
    from torch.utils.data import TensorDataset

    from dp_diffusers.families import DiTFamily
    from dp_diffusers.models.tiny import build_tiny_dit
    from dp_diffusers.trainable import TrainableConfig, select_trainable

    family = DiTFamily(build_tiny_dit())
    family.adopt_labels({0: "a", 1: "b"})
    select_trainable(
        family.denoiser,
        config=TrainableConfig(use_lora=True, lora_rank=2),
        embedder=family.embedder,
        block_classes=family.attention_block_classes,
    )
    model = family.loss_module().train()
    n, shape = 3, (2, 8, 8)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.rand(n, *shape) * 0.1, torch.tensor([0, 1, 1]))
    # lora_B starts at zero, so lora_A would get zero gradients: give B a value first.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(generator=g)
    engine_vs_loop(model, data, randomness(n, shape))


def test_lora_targets_follow_the_layer_selection():
    """One selection for full fine-tuning and LoRA: the adapters sit exactly on the linear layers that the same
    options unfreeze with scope attention_projections (or target_modules)."""
    from dp_diffusers.models.tiny import build_tiny_stable_diffusion
    from dp_diffusers.trainable import TrainableConfig, select_modules, select_trainable

    def adapted(**options):
        unet = build_tiny_stable_diffusion().unet
        report = select_trainable(unet, config=TrainableConfig(use_lora=True, lora_rank=2, **options))
        lora = sorted({n.split(".lora_")[0] for n, p in unet.named_parameters() if p.requires_grad})
        assert lora == sorted(report.modules)
        return report.modules

    names = adapted(attention_layers="7")
    assert len(names) == 8 and all(n.startswith("up_blocks.1.attentions.1.") for n in names)
    unet = build_tiny_stable_diffusion().unet
    full = select_modules(unet, config=TrainableConfig(scope="attention_projections", attention_layers="7"))
    assert names == [n for n, _ in full]
    regex = adapted(target_modules=r".*mid_block.*attn1\.to_[qv]")
    assert regex == [f"mid_block.attentions.0.transformer_blocks.0.attn1.to_{p}" for p in "qv"]
    with pytest.raises(UserInputError, match="lora_rank"):
        TrainableConfig(use_lora=True, lora_rank=0)
