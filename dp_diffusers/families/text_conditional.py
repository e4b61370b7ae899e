"""Text-conditional latent diffusion (``StableDiffusionPipeline``: ``AutoencoderKL`` + ``UNet2DConditionModel`` +
``CLIPTextModel`` + ``CLIPTokenizer``), as the paper's LAION text-to-image LDM -> CelebA-HQ setting.

What trains: the UNet's attention blocks (``Transformer2DModel``). With ``--train_text_encoder`` the CLIP text
encoder trains too and counts as the embedder: token embedding, transformer layers and final layer norm (all
``nn.Embedding`` / ``nn.Linear`` / ``nn.LayerNorm``, which Opacus supports). Its *position* embedding stays frozen: it
is indexed by a shared ``position_ids`` buffer of batch size 1, not by the example, so it has no per-example
gradient that Opacus could clip.

Prompts: each image's own caption (``--caption_column``), or ``--prompt_template`` filled with its label name
("a photo of a {label}"). Token ids are the per-example input; the text embedding is computed inside the
per-example loss, so a trained text encoder gets per-example gradients. A caption is part of its example: the
guarantee covers image and caption together. Conditioning dropout replaces a row's prompt by the empty prompt.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ..errors import UserInputError
from .base import DEFAULT_PROMPT_TEMPLATE, ModelFamily
from .common import ConditionalLoss, encode_images, plain_grid


class TextConditionalLoss(ConditionalLoss):
    """Per-row loss of a text-conditional UNet, shape ``[R]``; each row's token ids are encoded by the text encoder
    itself, and a dropped prompt is the empty prompt."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, empty_ids: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.unet = unet
        self.text_encoder = text_encoder
        self.register_buffer("empty_ids", empty_ids.long().view(1, -1), persistent=False)

    def drop_condition(self, condition: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        dropped = self.dropped(condition.shape[0], self.cond_drop_prob, condition.device, drop)
        if dropped is None:
            return condition
        return torch.where(dropped[:, None], self.empty_ids.to(condition.device), condition)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(condition)[0]
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden).sample


class TextConditionalLDM(ModelFamily):
    """The ``StableDiffusionPipeline`` family: denoiser ``unet``; embedder: the text encoder's trainable part with
    ``--train_text_encoder``, else none (frozen); frozen ``vae``."""

    name = "text-conditional-ldm"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = ("StableDiffusionPipeline",)
    supported_options = frozenset({"caption_column", "prompt_template", "train_text_encoder"})
    description = "A text-conditional latent diffusion model (Stable Diffusion)"

    def __init__(self, pipe: StableDiffusionPipeline):
        super().__init__(pipe)
        self.unet = pipe.unet
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.text_encoder.requires_grad_(False)
        self._prompts: list[str] | None = None
        self._id2label: dict[int, str] = {}
        self._embedder: nn.Module | None = None

    @property
    def needs_labels(self) -> bool:  # prompts from the template need label names; captions do not
        return self.options.caption_column is None

    @property
    def template(self) -> str:
        return self.options.prompt_template or DEFAULT_PROMPT_TEMPLATE

    # -- shapes and modules
    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def embedder(self) -> nn.Module | None:
        """With ``--train_text_encoder``: the text encoder less its position embedding (see the module docstring)."""
        if not self.options.train_text_encoder:
            return None
        if self._embedder is None:
            model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers < 5 nests it
            parts = [getattr(model, n, None) for n in ("embeddings", "encoder", "final_layer_norm")]
            if any(p is None for p in parts) or not hasattr(parts[0], "token_embedding"):
                kind = type(self.text_encoder).__name__
                raise UserInputError(f"`train_text_encoder` supports CLIP text encoders; this one is a {kind}.")
            self._embedder = nn.ModuleList([parts[0].token_embedding, parts[1], parts[2]])
        return self._embedder

    # -- prompts
    def prepare_data(self, loaded) -> None:
        """Per-image prompts: the caption column, or the template filled with each image's label name."""
        column = self.options.caption_column
        data = loaded.dataset
        if column is not None:
            if column not in data.column_names:
                raise UserInputError(
                    f"dataset '{loaded.source}' has no column '{column}' (columns: {', '.join(data.column_names)}); "
                    "pass `caption_column`=..."
                )
            captions = data.select_columns([column]).with_format("arrow")[:][column].to_pylist()
            if any(not isinstance(c, str) for c in captions):
                raise UserInputError(f"column '{column}' of dataset '{loaded.source}' must hold text captions.")
            self._prompts = captions
            return
        if "{label}" not in self.template:
            raise UserInputError(f"`prompt_template`={self.template!r} must contain '{{label}}'.")
        if loaded.label_column is None:
            raise UserInputError(
                "Prompts from `prompt_template` need labels: pass `label_column` or `caption_column`."
            )
        self._id2label = dict(loaded.id2label)
        labels = data.select_columns([loaded.label_column]).with_format("arrow")[:][loaded.label_column].to_pylist()
        self._prompts = [self.template.format(label=loaded.id2label[int(y)]) for y in labels]

    def adopt_labels(self, id2label: dict[int, str]) -> None:
        if id2label:
            self._id2label = dict(id2label)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # -- data and loss
    def encode(self, dataset, *, rows=None, device="cpu", batch_size: int = 256, progress: bool = True):
        if self._prompts is None:
            raise RuntimeError("prepare_data(loaded) reads the prompts: call it before encode().")
        if len(self._prompts) != len(dataset):
            raise RuntimeError(f"{len(self._prompts)} prompts for {len(dataset)} images.")
        latents, _ = encode_images(
            self.vae, dataset, rows=rows, batch_size=batch_size, device=device, progress=progress
        )
        prompts = self._prompts if rows is None else [self._prompts[i] for i in rows]
        return torch.utils.data.TensorDataset(*latents, self.tokenize(prompts))

    def encoder_fingerprint(self) -> dict:
        """The autoencoder, plus what the prompts and their tokens come from."""
        tokenizer = self.pipe.tokenizer
        return {
            **super().encoder_fingerprint(),
            "caption_column": self.options.caption_column,
            "prompt_template": None if self.options.caption_column else self.template,
            "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer)],
            "max_length": tokenizer.model_max_length,
        }

    def loss_module(self, *, cond_drop_prob: float = 0.0) -> TextConditionalLoss:
        return TextConditionalLoss(
            self.unet,
            self.text_encoder,
            self.tokenize([""])[0],
            cond_drop_prob=cond_drop_prob,
            **self.loss_schedule(),
        )

    # -- outputs
    def grid_prompts(self) -> list[str]:
        """One prompt per grid row: the template with each class name; never a private caption (it would leak)."""
        if self._id2label:
            return [self.template.format(label=self._id2label[i]) for i in sorted(self._id2label)]
        return [""]

    def grid_rows(self) -> int:
        return len(self.grid_prompts())

    grid_guidance_scale = 7.5  # Stable Diffusion's default; training drops prompts (cond_drop_prob) for it

    def sample_grid(self, *, per_class: int, num_inference_steps: int, seed: int, guidance_scale: float | None = None):
        self.pipe.set_progress_bar_config(disable=True)
        prompts = [p for p in self.grid_prompts() for _ in range(per_class)]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = self.pipe(
            prompt=prompts,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.grid_guidance(guidance_scale),
            generator=generator,
            output_type="pil",
        ).images
        return plain_grid(images, cols=per_class)

    def describe(self) -> dict:
        info = super().describe()
        source = f"caption column '{self.options.caption_column}'" if self.options.caption_column else None
        info["prompts"] = source or f"template {self.template!r} with the label names"
        info["text_encoder"] = (
            "trained (all but its position embedding)" if self.options.train_text_encoder else "frozen"
        )
        return info

    def usage(self, repo_or_path: str, *, lora: bool = False) -> str:
        load = f'pipe.load_lora_weights("{repo_or_path}")\n' if lora else ""
        prompt = self.grid_prompts()[0] or "a photo"
        return (
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{repo_or_path}")\n{load}'
            f'images = pipe("{prompt}", num_inference_steps=50).images'
        )
