"""Unconditional latent diffusion (``LDMPipeline``: ``VQModel`` + ``UNet2DModel``, e.g. CompVis' LDMs).

The UNet's attention lives in ``AttnDownBlock2D`` / ``AttnUpBlock2D`` / the mid block as bare diffusers
``Attention`` modules (group norm, q/k/v/out, residual): those self-attention blocks train, as in the paper's
unconditional CelebA setting (CompVis ``AttentionBlock``). Labels of the private data, if any, are ignored.
"""

from __future__ import annotations

import torch
from diffusers import LDMPipeline
from torch import nn

from .base import ModelFamily
from .common import DiffusionLoss, encode_images, plain_grid


class UnconditionalLoss(DiffusionLoss):
    """Per-row epsilon loss of an unconditional UNet, shape ``[R]``; rows never mix (GroupNorm is per sample)."""

    def __init__(self, unet: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.unet = unet

    def forward(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor | None = None,
        *,
        latent_noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z = self.latents(latent_mean, latent_std, latent_noise)
        noisy, t, target = self.noised(z, timesteps, noise)
        return self.mse(self.unet(noisy, t).sample, target)


class UnconditionalLDM(ModelFamily):
    """The ``LDMPipeline`` family: denoiser ``unet`` (self-attention blocks train), frozen ``vqvae``, no embedder."""

    name = "unconditional-ldm"
    pipeline_class = LDMPipeline
    pipeline_class_names = ("LDMPipeline",)
    needs_labels = False
    description = "An unconditional latent diffusion model"

    autoencoder_component = "vqvae"

    def __init__(self, pipe: LDMPipeline):
        super().__init__(pipe)
        self.unet = pipe.unet

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def encode(self, dataset, *, rows=None, device="cpu", batch_size: int = 256, progress: bool = True):
        latents, _ = encode_images(
            self.vae, dataset, rows=rows, batch_size=batch_size, device=device, progress=progress
        )
        return torch.utils.data.TensorDataset(*latents)

    def loss_module(self, *, cond_drop_prob: float = 0.0) -> UnconditionalLoss:
        return UnconditionalLoss(self.unet, **self.loss_schedule())

    def grid_guidance(self, guidance_scale: float | None = None) -> float:
        return 1.0  # no classes to guide towards

    def sample_grid(self, *, per_class: int, num_inference_steps: int, seed: int, guidance_scale: float | None = None):
        """A plain grid (no classes, so no guidance): one row of ``per_class`` samples."""
        self.pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = self.pipe(
            batch_size=per_class, num_inference_steps=num_inference_steps, generator=generator, output_type="pil"
        ).images
        return plain_grid(images, cols=per_class)

    def usage(self, repo_or_path: str, *, lora: bool = False) -> str:
        return (
            f'from diffusers import LDMPipeline\n\npipe = LDMPipeline.from_pretrained("{repo_or_path}")\n'
            "images = pipe(batch_size=8, num_inference_steps=50).images"
        )
