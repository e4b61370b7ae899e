"""Configurations of our class-conditional LDM, assembled from stock diffusers models.

Nothing here is a hand-written network: ``AutoencoderKL`` compresses 28x28 (or any 4k x 4k) images 4x per side,
``UNet2DConditionModel`` denoises the latents and attends to the :class:`ClassEmbedder` tokens through its
``Transformer2DModel`` blocks (7 of them with the default layout, as in the paper's MNIST UNet), ``DDPMScheduler``
trains and ``DDIMScheduler`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from .class_embedder import ClassEmbedder


@dataclass
class LDMConfig:
    """Size knobs of the class-conditional LDM (each maps onto a diffusers config field)."""

    image_size: int = field(default=28, metadata={"help": "Side of the square images, a multiple of 4."})
    in_channels: int = field(default=1, metadata={"help": "Image channels: 1 (grayscale) or 3 (RGB)."})
    latent_channels: int = field(default=4, metadata={"help": "Channels of the autoencoder's latent."})
    vae_channels: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "AutoencoderKL block widths."})
    unet_channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "UNet block widths."})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet/attention layers per UNet block."})
    attention_levels: tuple[bool, ...] | None = field(
        default=None,
        metadata={
            "help": "Per UNet level, whether its blocks carry attention (default: every level). The mid block "
            "always does."
        },
    )
    attention_heads: int = field(default=2, metadata={"help": "Heads of every attention layer."})
    cond_dim: int = field(default=64, metadata={"help": "Width of the class tokens (cross_attention_dim)."})
    num_cond_tokens: int = field(default=4, metadata={"help": "Tokens per class (must be >= 2, see ClassEmbedder)."})
    num_classes: int = field(default=10, metadata={"help": "Number of classes (a null class is added)."})
    norm_num_groups: int = field(default=32, metadata={"help": "GroupNorm groups in UNet and VAE."})
    unet_norm_num_groups: int | None = field(
        default=None, metadata={"help": "GroupNorm groups of the UNet alone (default: norm_num_groups)."}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "DDPM training timesteps."})

    @property
    def downsampling(self) -> int:
        """How many times smaller than the images the autoencoder's latents are, per side."""
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latents the denoiser works on."""
        return self.image_size // self.downsampling


#: The default layout of ``examples/pretrain_public_ldm.py`` (that of
#: ``benchmarks/mnist/priors/public-drawn-digits-long``): 7 attention blocks. The shipped ``DEFAULT_PUBLIC_MODEL``
#: (``public-drawn-digits-wide``) widens its denoiser to ``unet_channels=(48, 96)`` with ``unet_norm_num_groups=16``.
DEFAULT = LDMConfig()

#: The denoiser of the paper's CIFAR-10 model (official config ``imagenet32-conditional`` / ``cifar32-dp-eps10``:
#: 16x16x3 latents, 128 base channels x (1, 2, 2, 4), 2 ResNet layers per level, attention at the three finest
#: levels plus the mid block = 16 attention blocks, 8 heads, 512-wide class tokens) rebuilt from diffusers blocks.
#: Used by ``benchmarks/step_cost.py --model_config paper_cifar10`` to measure step cost at the paper's scale; its
#: autoencoder is a small stand-in (the benchmark feeds synthetic latents).
PAPER_CIFAR10 = LDMConfig(
    image_size=32,
    in_channels=3,
    latent_channels=3,
    vae_channels=(32, 64),
    unet_channels=(128, 256, 256, 512),
    layers_per_block=2,
    attention_levels=(True, True, True, False),
    attention_heads=8,
    cond_dim=512,
    num_cond_tokens=2,
)

TINY = LDMConfig(
    vae_channels=(8, 16, 16),
    latent_channels=2,
    unet_channels=(16, 32),
    attention_heads=2,
    cond_dim=16,
    norm_num_groups=4,
)


def autoencoder_kwargs(cfg: LDMConfig) -> dict:
    """Config of a ``len(vae_channels) - 1`` times downsampling autoencoder (AutoencoderKL or VQModel)."""
    n = len(cfg.vae_channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.norm_num_groups, min(cfg.vae_channels)),
        sample_size=cfg.image_size,
    )


def build_vae(cfg: LDMConfig) -> AutoencoderKL:
    # No attention in the autoencoder's mid block: it is public, frozen, and small images do not need it.
    return AutoencoderKL(**autoencoder_kwargs(cfg), mid_block_add_attention=False)


def build_unet(cfg: LDMConfig, latent_size: int) -> UNet2DConditionModel:
    attention = cfg.attention_levels or (True,) * len(cfg.unet_channels)
    if len(attention) != len(cfg.unet_channels):
        raise ValueError(f"attention_levels has {len(attention)} entries for {len(cfg.unet_channels)} UNet levels.")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_heads,  # diffusers' historical name: this is the number of heads
        cross_attention_dim=cfg.cond_dim,
        norm_num_groups=cfg.unet_norm_num_groups or cfg.norm_num_groups,
        use_linear_projection=True,
    )


def build_class_conditional_ldm(cfg: LDMConfig | None = None, id2label: dict[int, str] | None = None):
    """Returns ``dict(vae, unet, embedder, scheduler)`` of a randomly initialised class-conditional LDM.

    ``scheduler`` is the DDIM sampler; training uses ``DDPMScheduler.from_config(scheduler.config)``.
    """
    cfg = cfg or LDMConfig()
    if cfg.image_size % cfg.downsampling:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of {cfg.downsampling}.")
    if cfg.num_cond_tokens < 2:
        raise ValueError("num_cond_tokens must be >= 2: with one token, cross-attention's to_q/to_k get no gradient.")
    vae = build_vae(cfg)
    unet = build_unet(cfg, cfg.latent_size)
    embedder = ClassEmbedder(
        num_classes=cfg.num_classes, embed_dim=cfg.cond_dim, num_tokens=cfg.num_cond_tokens, id2label=id2label
    )
    # clip_sample=False: latents are not images in [-1, 1]; clipping the predicted x0 there ruins latent samples.
    ddpm = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear", clip_sample=False)
    scheduler = DDIMScheduler.from_config(ddpm.config)
    return {"vae": vae, "unet": unet, "embedder": embedder, "scheduler": scheduler}
