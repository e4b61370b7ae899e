"""Our class-conditional LDM (``DPLDMPipeline``): latents of a frozen autoencoder, UNet + class embedder."""

from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import UserInputError
from ..grids import pipeline_class_grid
from ..pipelines import DPLDMPipeline
from .base import ModelFamily
from .common import LabelConditionalLoss, encode_images


class ClassConditionalLoss(LabelConditionalLoss):
    """Per-row DDPM loss of the UNet cross-attending to the class embedder's tokens, shape ``[R]``.

    Nothing mixes rows (the UNet's GroupNorms are per-sample), so each row's loss depends on its own example only.
    With noise multiplicity K, the caller repeats each example K times and each copy draws independently.
    """

    def __init__(self, unet: nn.Module, embedder: nn.Module, **kwargs):
        super().__init__(embedder, **kwargs)
        self.unet = unet

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=self.embedder(labels)).sample


class ClassConditionalLDM(ModelFamily):
    """The ``DPLDMPipeline`` family: denoiser ``unet``, conditioning ``embedder``, frozen ``vae``."""

    name = "class-conditional-ldm"
    pipeline_class = DPLDMPipeline
    pipeline_class_names = ("DPLDMPipeline",)
    description = "A class-conditional latent diffusion model"

    def __init__(self, pipe: DPLDMPipeline):
        super().__init__(pipe)
        self.unet = pipe.unet

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def embedder(self) -> nn.Module:
        return self.pipe.embedder

    @property
    def id2label(self) -> dict[int, str]:
        return self.embedder.id2label

    def check_labels(self, labels: torch.Tensor, id2label: dict[int, str] | None = None) -> None:
        n = self.embedder.config.num_classes
        if labels.numel() and (labels.min() < 0 or labels.max() >= n):
            raise UserInputError(
                f"Labels span {int(labels.min())}..{int(labels.max())} but the model's embedder has {n} classes "
                f"(0..{n - 1}): use a dataset with at most {n} classes or a base model with more."
            )

    def adopt_labels(self, id2label: dict[int, str]) -> str | None:
        """Private class i trains embedder row i and takes its name: the output's ``id2label`` holds the private
        classes only (rows beyond them keep the public weights, unused). Returns the mapping, for the log."""
        n = self.embedder.config.num_classes
        if len(id2label) > n:
            raise UserInputError(
                f"The private data has {len(id2label)} classes but the base model's embedder has {n}: use a base "
                f"model with at least {len(id2label)} classes."
            )
        if not id2label:
            return None
        public = self.embedder.id2label
        self.embedder.register_to_config(id2label={int(k): str(v) for k, v in id2label.items()})
        pairs = ", ".join(f"{name!r} -> row {i} (was {public.get(i)!r})" for i, name in sorted(id2label.items()))
        unused = f"; rows {len(id2label)}..{n - 1} unused" if len(id2label) < n else ""
        return f"private classes -> embedder rows: {pairs}{unused}"

    def usage(self, repo_or_path: str, *, lora: bool = False) -> str:
        load = f'pipe.load_lora_weights("{repo_or_path}")\n' if lora else ""
        names = [name for _, name in sorted(self.embedder.id2label.items())][:4]
        # json.dumps, not repr: double-quoted (ruff-formatted) Python literals in the card's code block.
        return (
            f'from dp_diffusers import DPLDMPipeline\n\npipe = DPLDMPipeline.from_pretrained("{repo_or_path}")\n'
            f"{load}print(pipe.id2label)\n"
            f"images = pipe(class_labels={json.dumps(names)}, num_inference_steps=50).images"
        )

    def encode(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        rows=None,
        batch_size: int = 256,
        device="cpu",
        progress: bool = True,
    ) -> torch.utils.data.TensorDataset:
        (mean, std), labels = encode_images(
            self.vae, dataset, rows=rows, batch_size=batch_size, device=device, progress=progress
        )
        self.check_labels(labels)
        return torch.utils.data.TensorDataset(mean, std, labels)

    def loss_module(self, *, cond_drop_prob: float = 0.0) -> ClassConditionalLoss:
        return ClassConditionalLoss(self.unet, self.embedder, cond_drop_prob=cond_drop_prob, **self.loss_schedule())

    def grid_rows(self) -> int:
        return len(self.embedder.id2label)

    # Guidance 2 shows what the model draws for each class: on the embedded demo the MNIST judge of
    # benchmarks/embedded_default.py reads 0.69 of the private model's samples as their class without guidance and
    # 0.92 with it (1.5: 0.84; 3: 0.95, at a larger distance to the private style). Sampling for a downstream
    # classifier is another matter: guidance trades away the diversity it needs (benchmarks/mnist/README.md).
    grid_guidance_scale = 2.0

    def sample_grid(self, *, per_class: int, num_inference_steps: int, seed: int, guidance_scale: float | None = None):
        self.pipe.set_progress_bar_config(disable=True)
        return pipeline_class_grid(
            self.pipe,
            per_class=per_class,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.grid_guidance(guidance_scale),
            seed=seed,
        )
