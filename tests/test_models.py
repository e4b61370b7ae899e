import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dp_diffusers import ClassEmbedder
from dp_diffusers.models.configs import TINY, build_class_conditional_ldm
from dp_diffusers.trainable import TrainableConfig, attention_blocks, select_trainable


def diffusion_loss(parts, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet, embedder = parts["unet"], parts["embedder"]
    z = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, embedder.config.num_classes, (batch,), generator=g)
    noisy = DDPMScheduler(num_train_timesteps=1000).add_noise(z, noise, t)
    return F.mse_loss(unet(noisy, t, encoder_hidden_states=embedder(y)).sample, noise)


def test_every_trained_tensor_gets_a_nonzero_gradient(tiny_parts):
    report = select_trainable(tiny_parts["unet"], embedder=tiny_parts["embedder"])
    assert len(attention_blocks(tiny_parts["unet"])) == 7  # the paper's MNIST UNet also has 7
    diffusion_loss(tiny_parts).backward()
    trained = [(n, p) for m in ("unet", "embedder") for n, p in tiny_parts[m].named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trained) == report.trainable
    for name, p in trained:
        assert p.grad is not None and p.grad.abs().max() > 1e-6, name
    assert any("attn2.to_k" in n for n, _ in trained) and any("attn2.to_q" in n for n, _ in trained)


def test_single_class_token_starves_cross_attention_query_and_key():
    """Why ClassEmbedder uses several tokens: with one token, softmax == 1 and attn2.to_q/to_k learn nothing."""
    parts = build_class_conditional_ldm(dataclasses.replace(TINY, num_cond_tokens=2))
    parts["embedder"] = ClassEmbedder(num_classes=10, embed_dim=TINY.cond_dim, num_tokens=1)
    select_trainable(parts["unet"], embedder=parts["embedder"])
    diffusion_loss(parts).backward()
    to_k = [p.grad.abs().max().item() for n, p in parts["unet"].named_parameters() if "attn2.to_k" in n]
    to_v = [p.grad.abs().max().item() for n, p in parts["unet"].named_parameters() if "attn2.to_v" in n]
    assert max(to_k) < 1e-6 < min(to_v)
    with pytest.raises(ValueError, match="num_cond_tokens"):
        build_class_conditional_ldm(dataclasses.replace(TINY, num_cond_tokens=1))


def test_selector_options_and_counts(tiny_parts):
    unet, emb = tiny_parts["unet"], tiny_parts["embedder"]
    full = select_trainable(unet, embedder=emb)
    total = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in emb.parameters())
    assert full.total == total and 0 < full.fraction < 1
    late = select_trainable(unet, config=TrainableConfig(attention_layers="5-7"), embedder=emb)
    names = [n for n, _ in attention_blocks(unet)]
    assert late.modules == names[4:] + ["embedder"] and late.trainable < full.trainable
    proj = select_trainable(
        unet, config=TrainableConfig(scope="attention_projections", train_embedder=False), embedder=emb
    )
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trained and all(any(k in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in trained)
    assert all(not p.requires_grad for p in emb.parameters()) and proj.trainable == sum(
        p.numel() for p in unet.parameters() if p.requires_grad
    )
    regex = select_trainable(unet, config=TrainableConfig(target_modules=r".*attn1\.to_v"), embedder=None)
    assert regex.modules and all(m.endswith("attn1.to_v") for m in regex.modules)
    assert {n.rsplit(".", 1)[0] for n, p in unet.named_parameters() if p.requires_grad} == set(regex.modules)


def test_forward_order_numbering(tiny_parts):
    names = [n for n, _ in attention_blocks(tiny_parts["unet"])]
    assert (
        names[0].startswith("down_blocks.0")
        and names[2].startswith("mid_block")
        and names[-1].startswith("up_blocks.1")
    )


@pytest.mark.parametrize("spec", ["0-3", "5-9", "x", "7-5"])
def test_bad_layer_range(tiny_parts, spec):
    from dp_diffusers import UserInputError

    with pytest.raises(UserInputError, match="attention_layers"):
        select_trainable(tiny_parts["unet"], config=TrainableConfig(attention_layers=spec))


def test_full_scope_trains_every_denoiser_parameter(tiny_parts):
    unet, emb = tiny_parts["unet"], tiny_parts["embedder"]
    report = select_trainable(unet, config=TrainableConfig(scope="full"), embedder=emb)
    assert all(p.requires_grad for p in unet.parameters()) and all(p.requires_grad for p in emb.parameters())
    assert report.trainable == report.total and report.modules == [
        "UNet2DConditionModel (every parameter)",
        "embedder",
    ]


def test_attention_up_resnets_scope_adds_only_the_up_path_resnets(tiny_parts):
    unet, emb = tiny_parts["unet"], tiny_parts["embedder"]
    attention = select_trainable(unet, config=TrainableConfig(scope="attention_blocks"), embedder=emb)
    wider = select_trainable(unet, config=TrainableConfig(scope="attention_up_resnets"), embedder=emb)
    resnets = [n for n in wider.modules if n not in attention.modules]
    assert resnets and all(n.startswith("up_blocks.") and ".resnets." in n for n in resnets)
    assert set(attention.modules) < set(wider.modules)
    for name, param in unet.named_parameters():  # exactly the attention blocks and the up-path ResNets train
        expected = any(name.startswith(m + ".") for m in wider.modules if m != "embedder")
        assert param.requires_grad == expected, name
    down = [m for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D" and not n.startswith("up_")]
    assert down and not any(p.requires_grad for m in down for p in m.parameters())
    assert attention.trainable < wider.trainable < wider.total


@pytest.mark.parametrize(
    "options, needle",
    [
        (dict(target_modules=["to_q"], scope="attention_blocks"), "`target_modules` chooses the modules by itself"),
        (dict(target_modules=["to_q"], attention_layers="1-2"), "`attention_layers` would be ignored"),
        (dict(scope="full", attention_layers="1-2"), "scope 'full' trains every parameter"),
        (dict(use_lora=True, scope="attention_blocks"), "`use_lora` puts adapters on the attention projections"),
        (dict(use_lora=True, scope="full"), "drop the scope"),
        (dict(lora_rank=8), "`lora_rank` and `lora_alpha` apply to LoRA adapters only"),
        (dict(lora_alpha=16.0), "add `use_lora`"),
        (dict(use_lora=True, lora_rank=0), "`lora_rank` must be a positive integer"),
        (dict(scope="everything"), "use one of attention_blocks, attention_projections, attention_up_resnets, full"),
    ],
)
def test_conflicting_choices_are_refused_when_the_config_is_made(options, needle):
    """Nothing is silently ignored: target_modules used to override scope and attention_layers, and use_lora the
    scope, without a word."""
    from dp_diffusers import UserInputError

    with pytest.raises(UserInputError, match=re.escape(needle)):
        TrainableConfig(**options)


def test_matches_target_has_peft_semantics():
    from dp_diffusers.trainable import matches_target

    assert matches_target("a.attn1.to_q", ["to_q"]) and matches_target("to_q", ["to_q"])
    assert not matches_target("a.attn1.to_qx", ["to_q"])
    assert matches_target("a.attn1.to_q", r".*attn1\.to_q") and not matches_target("a.attn1.to_q", r"attn1\.to_q")
