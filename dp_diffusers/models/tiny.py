"""Tiny, randomly initialised pipelines of every supported family, built offline from configs (tests, benchmarks).

Each has a few hundred thousand parameters and 32x32 RGB images (8x8 latents). Nothing is downloaded: the CLIP
tokenizer is a byte-level BPE over the 256 byte symbols (each alone and as a word end, no merges), built in memory
with ``CLIPTokenizer(vocab=..., merges=[])``; it encodes any text (one token per byte) and saves/loads like any
``CLIPTokenizer``.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DModel,
    VQModel,
)

from .configs import TINY, autoencoder_kwargs, build_vae

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_RGB = dataclasses.replace(TINY, in_channels=3, image_size=32)


def tiny_clip_tokenizer(model_max_length: int = 77):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({BOS: 2 * len(symbols), EOS: 2 * len(symbols) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_clip_text_model(hidden_size: int = 32, max_position_embeddings: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )


def _ddim(**kwargs) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1, **kwargs)


def build_tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """AutoencoderKL + UNet2DConditionModel (cross-attention to 32-d CLIP states) + tiny CLIP, 32x32 RGB."""
    from .configs import build_unet

    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY_RGB, cond_dim=32)
    return StableDiffusionPipeline(
        vae=build_vae(cfg),
        text_encoder=tiny_clip_text_model(hidden_size=cfg.cond_dim),
        tokenizer=tiny_clip_tokenizer(),
        unet=build_unet(cfg, cfg.image_size // 4),
        scheduler=_ddim(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_dit(seed: int = 0, num_classes: int = 1000, id2label: dict[int, str] | None = None) -> DiTPipeline:
    """AutoencoderKL + DiTTransformer2DModel (2 blocks, learned sigma), 32x32 RGB. As in a converted DiT checkpoint,
    every block holds the same label table (DiT has one ``y_embedder``)."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=TINY_RGB.latent_channels,
        out_channels=2 * TINY_RGB.latent_channels,
        num_layers=2,
        sample_size=TINY_RGB.latent_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )
    blocks = transformer.transformer_blocks
    with torch.no_grad():
        for block in blocks[1:]:
            block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    pipe = DiTPipeline(transformer=transformer, vae=build_vae(TINY_RGB), scheduler=_ddim(), id2label=id2label)
    if id2label:
        pipe.register_to_config(id2label=id2label)
    return pipe


def build_tiny_ldm(seed: int = 0) -> LDMPipeline:
    """VQModel + UNet2DModel with self-attention blocks (AttnDownBlock2D, mid block, AttnUpBlock2D), 32x32 RGB."""
    torch.manual_seed(seed)
    cfg = TINY_RGB
    vqvae = VQModel(**autoencoder_kwargs(cfg), num_vq_embeddings=64, vq_embed_dim=cfg.latent_channels)
    unet = UNet2DModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
    )
    return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_ddim())
