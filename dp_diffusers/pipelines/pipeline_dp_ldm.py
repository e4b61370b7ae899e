"""``DPLDMPipeline``: class-conditional sampling from a (privately fine-tuned) latent diffusion model."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel, VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from ..models.class_embedder import ClassEmbedder


class DPLDMPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""Class-conditional latent diffusion: ``embedder`` tokens -> ``unet`` cross-attention -> ``vae`` decoder.

    Args:
        vae: ``AutoencoderKL`` or ``VQModel`` that maps latents to images.
        unet: ``UNet2DConditionModel`` whose ``Transformer2DModel`` blocks attend to the class tokens.
        embedder: :class:`~dp_diffusers.ClassEmbedder` (its extra null class enables classifier-free guidance).
        scheduler: a diffusers scheduler; DDIM by default.
    """

    model_cpu_offload_seq = "embedder->unet->vae"
    _lora_loadable_modules = ["unet"]  # LoRA on the UNet's attention (train_dp_ldm.py --use_lora); no text encoder

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        unet: UNet2DConditionModel,
        embedder: ClassEmbedder,
        scheduler: DDIMScheduler | KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, embedder=embedder, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """``DiffusionPipeline.from_pretrained``, also for a ``pathlib.Path`` (diffusers expects a string)."""
        return super().from_pretrained(os.fspath(pretrained_model_name_or_path), **kwargs)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """Load LoRA weights in diffusers' format (e.g. ``pytorch_lora_weights.safetensors`` written by
        ``train_dp_ldm.py --use_lora``) into ``self.unet``; as ``StableDiffusionPipeline.load_lora_weights``, less
        the text encoder this pipeline does not have."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        hotswap = kwargs.pop("hotswap", False)
        kwargs["return_lora_metadata"] = True
        state_dict, network_alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
        self.load_lora_into_unet(
            state_dict,
            network_alphas=network_alphas,
            unet=self.unet,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @property
    def id2label(self) -> dict[int, str]:
        return self.embedder.id2label

    def get_label_ids(self, labels: Sequence[int | str] | int | str) -> list[int]:
        """Class ids for ints or label names, as ``DiTPipeline.get_label_ids`` does for ImageNet names."""
        return self.embedder.resolve_labels(labels)

    def _scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self._scale()
        if isinstance(self.vae, VQModel):
            return self.vae.decode(latents).sample
        return self.vae.decode(latents).sample

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int | str] | int | str | None = None,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation: one image per entry of ``class_labels``.

        Args:
            class_labels (`int`, `str` or `List[int | str]`, *optional*):
                Class ids or label names (see `pipe.id2label`). `None` draws `batch_size` classes uniformly from
                `pipe.id2label` with `generator`.
            batch_size (`int`, *optional*, defaults to 1):
                Number of images when `class_labels` is `None`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of denoising steps (>= 1). More steps usually give better images and take longer.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance weight `w` in `uncond + w * (cond - uncond)`, with the embedder's null
                class as `uncond`. Values above 1 strengthen the class; 1.0, and any value in [0, 1], samples the
                plain conditional model (no guidance pass); negative values are refused.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta: 0 is deterministic DDIM, 1 is DDPM-like. Ignored by schedulers without it.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) to make
                generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Initial Gaussian noise of shape `[B, C, h, w]` (the UNet's latent shape); drawn with `generator`
                when not given.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (PIL images), `"np"` (`[B, H, W, C]` floats in [0, 1]), `"pt"` (`[B, C, H, W]`) or
                `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.

        Examples:

        ```py
        >>> from dp_diffusers import DEFAULT_PUBLIC_MODEL, DPLDMPipeline

        >>> pipe = DPLDMPipeline.from_pretrained(DEFAULT_PUBLIC_MODEL)
        >>> print(pipe.id2label)
        >>> images = pipe(class_labels=[0, 1, "7"], num_inference_steps=50, guidance_scale=1.0).images
        >>> images[0].save("digit_0.png")
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.ImagePipelineOutput`] is returned, otherwise a `tuple` whose
                first element is the list of generated images.
        """
        if not guidance_scale >= 0:  # also refuses NaN
            raise ValueError(
                f"guidance_scale must be >= 0, got {guidance_scale}: 1.0 (or any value <= 1) samples without "
                "guidance, values above 1 strengthen the class."
            )
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}.")
        device = self._execution_device
        if class_labels is None:
            if int(batch_size) < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
            gen = generator[0] if isinstance(generator, list) else generator
            named = torch.tensor(sorted(self.id2label), dtype=torch.long)  # the classes in use (all, by default)
            ids = named[torch.randint(0, len(named), (int(batch_size),), generator=gen, device="cpu")]
        else:
            ids = torch.tensor(self.get_label_ids(class_labels), dtype=torch.long)
        ids = ids.to(device)
        batch = ids.shape[0]

        do_cfg = guidance_scale > 1.0
        cond = self.embedder(ids)
        if do_cfg:
            null = torch.full_like(ids, self.embedder.null_class_id)
            cond = torch.cat([self.embedder(null), cond])
        cond = cond.to(self.unet.dtype)

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = {}
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise_pred = self.unet(model_in, t, encoder_hidden_states=cond).sample
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents.to(self.vae.dtype))
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
