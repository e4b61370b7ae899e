"""Pieces shared by the families: encoding private images with a frozen autoencoder, and the per-row noising of a
DDPM (epsilon- or v-prediction) loss with optional explicit randomness (tests compare per-example gradients)."""

from __future__ import annotations

import torch
from diffusers.utils import make_image_grid
from torch import nn
from tqdm.auto import tqdm


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_scaling_factor(vae: nn.Module) -> float:
    """The factor latents are multiplied by before diffusion (``vae.config.scaling_factor``; 1 when absent)."""
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def sample_size(config) -> int:
    size = config.sample_size
    return int(size if isinstance(size, int) else size[0])


@torch.no_grad()
def encode_images(
    vae: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    rows=None,
    batch_size: int = 256,
    device="cpu",
    progress: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Latents of every image, once (deterministic per example, so no privacy cost), and the labels.

    A KL autoencoder gives ``[mean, std]`` of its latent distribution (each training row draws its own sample); a
    VQ autoencoder gives ``[latents]`` (its pre-quantisation output, which its decoder quantises). ``rows``: encode
    only these rows of ``dataset`` (default: all).
    """
    if rows is not None:
        dataset = torch.utils.data.Subset(dataset, list(rows))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    vae.to(device)
    parts: list[list[torch.Tensor]] = []
    labels = []
    for batch in tqdm(loader, desc="encoding private latents", disable=not progress):
        encoded = vae.encode(batch["pixel_values"].to(device, vae.dtype))
        if hasattr(encoded, "latent_dist"):
            tensors = [encoded.latent_dist.mean, encoded.latent_dist.std]
        else:
            tensors = [encoded.latents]
        parts.append([t.float().cpu() for t in tensors])
        labels.append(batch["labels"].long())
    latents = [torch.cat(column) for column in zip(*parts, strict=True)]
    return latents, torch.cat(labels)


class DiffusionLoss(nn.Module):
    """Per-row DDPM loss helpers. Each row draws its own latent sample, timestep and noise unless they are given
    (``latent_noise``, ``timesteps``, ``noise``: tests pass them to reproduce a row's loss alone)."""

    def __init__(
        self,
        *,
        num_train_timesteps: int,
        alphas_cumprod: torch.Tensor,
        scaling_factor: float,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction).")
        self.num_train_timesteps = num_train_timesteps
        self.scaling_factor = scaling_factor
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def latents(self, mean: torch.Tensor, std: torch.Tensor | None, latent_noise: torch.Tensor | None = None):
        if std is None:
            return mean * self.scaling_factor
        eps = torch.randn_like(std) if latent_noise is None else latent_noise
        return (mean + std * eps) * self.scaling_factor

    def noised(self, z: torch.Tensor, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """``(noisy latents, timesteps, target)``: DDPMScheduler.add_noise without its dtype round trips."""
        rows = z.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (rows,), device=z.device) if timesteps is None else timesteps
        noise = torch.randn_like(z) if noise is None else noise
        a = self.alphas_cumprod.to(z.device)[t].view(rows, *([1] * (z.dim() - 1)))
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        target = noise if self.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        return noisy, t, target

    @staticmethod
    def dropped(rows: int, prob: float, device, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """Which rows lose their conditioning (classifier-free guidance training); None: none."""
        if drop is not None:
            return drop.to(device=device, dtype=torch.bool)
        if prob <= 0:
            return None
        return torch.rand(rows, device=device) < prob

    def drop_labels(
        self, labels: torch.Tensor, *, prob: float, null_id: int, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``labels`` with the dropped rows (see :meth:`dropped`) replaced by the null class ``null_id``."""
        dropped = self.dropped(labels.shape[0], prob, labels.device, drop)
        return labels if dropped is None else torch.where(dropped, torch.full_like(labels, null_id), labels)

    @staticmethod
    def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class ConditionalLoss(DiffusionLoss):
    """Per-row loss of a conditioned denoiser, shape ``[R]``, with per-row condition dropout (classifier-free
    guidance training). Each row draws its own latent sample, condition dropout, timestep and noise (or takes them as
    arguments: tests reproduce one row's loss alone). A family says how a dropped condition looks
    (:meth:`drop_condition`) and how its denoiser predicts (:meth:`predict`)."""

    def __init__(self, *, cond_drop_prob: float = 0.0, **schedule):
        super().__init__(**schedule)
        self.cond_drop_prob = cond_drop_prob

    def drop_condition(self, condition: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        condition: torch.Tensor,
        *,
        latent_noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z = self.latents(latent_mean, latent_std, latent_noise)
        condition = self.drop_condition(condition, drop)
        noisy, t, target = self.noised(z, timesteps, noise)
        return self.mse(self.predict(noisy, t, condition), target)


class LabelConditionalLoss(ConditionalLoss):
    """A :class:`ConditionalLoss` on class labels through a trained ``embedder`` whose null class stands for a
    dropped label."""

    def __init__(self, embedder: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.embedder = embedder

    def drop_condition(self, condition: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        return self.drop_labels(condition, prob=self.cond_drop_prob, null_id=self.embedder.null_class_id, drop=drop)


def plain_grid(images, *, cols: int):
    rows = max(1, len(images) // cols)
    return make_image_grid(images[: rows * cols], rows=rows, cols=cols)
