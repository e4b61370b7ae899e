"""What the training script needs from a model family; nothing here knows of Opacus."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image
from torch import nn

from ..errors import UserInputError
from .common import latent_scaling_factor, sample_size, vae_scale_factor

DEFAULT_PROMPT_TEMPLATE = "a photo of a {label}"


@dataclass
class FamilyOptions:
    """Family-specific choices (command-line flags); a family refuses the ones it does not support."""

    label_map: dict[int, int] | None = None  # DiT: private label id -> the model's class id
    caption_column: str | None = None  # text-conditional: per-image prompts from this column
    prompt_template: str | None = None  # text-conditional: prompts from the label names (default: a photo of a ..)
    train_text_encoder: bool = False  # text-conditional: the text encoder trains as the embedder

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]


def parse_label_map(spec: str | None) -> dict[int, int] | None:
    """``"0:207,1:360"`` -> ``{0: 207, 1: 360}`` (private label id -> the base model's class id)."""
    if spec is None or not str(spec).strip():
        return None
    mapping: dict[int, int] = {}
    try:
        for part in str(spec).replace(" ", "").split(","):
            key, sep, value = part.partition(":")
            if not sep or int(key) in mapping:
                raise ValueError
            mapping[int(key)] = int(value)
    except ValueError:
        raise UserInputError(
            f"`label_map`={spec!r} is not a list of private_id:model_class_id pairs, e.g. '0:207,1:360'."
        ) from None
    return mapping


class ModelFamily:
    """A public diffusers pipeline seen as: frozen encoder + trainable denoiser/embedder + a per-example loss.

    Subclasses set ``name``, ``pipeline_class``, ``pipeline_class_names`` (model_index ``_class_name`` values they
    load), ``description`` and ``usage()``, and implement the methods below. ``denoiser`` is searched for attention
    blocks (of the classes ``attention_block_classes``, None: ``trainable.BLOCK_CLASS_NAMES``); ``embedder`` (or None)
    is the conditioning embedder trained beside them.

    The order of use, in three steps:

    1. :meth:`prepare` with the loaded private data set (reads what the family needs, e.g. captions, and adopts its
       declared label set);
    2. :meth:`encode` the private images (frozen encoders, once);
    3. :meth:`loss_module` to train, then :meth:`export_pipeline` to save (it ends training on some families).
    """

    name: str = ""
    pipeline_class: type[DiffusionPipeline] = DiffusionPipeline
    pipeline_class_names: tuple[str, ...] = ()
    needs_labels: bool = True
    #: Class names of the attention blocks to train, most specific first (None: the selector's default search).
    attention_block_classes: tuple[str, ...] | None = None
    #: ``FamilyOptions`` fields this family understands.
    supported_options: frozenset[str] = frozenset()
    #: What the privacy card says the model is (each family says it).
    description: str
    #: The pipeline component that holds the frozen autoencoder.
    autoencoder_component: str = "vae"

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.options = FamilyOptions()
        self.vae = getattr(pipe, self.autoencoder_component)
        self.vae.requires_grad_(False)
        # Training noises with the DDPM forward process whatever sampler the pipeline ships (DDIM, ...).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @classmethod
    def from_pretrained(cls, path: str, *, options: FamilyOptions | None = None, **kwargs) -> ModelFamily:
        family = cls(cls.pipeline_class.from_pretrained(path, **kwargs))
        family.configure(options or FamilyOptions())
        return family

    def configure(self, options: FamilyOptions) -> None:
        """Adopt family options; refuse those this family does not support (one-line error naming the flag)."""
        unsupported = [name for name in options.given() if name not in self.supported_options]
        if unsupported:
            flags = ", ".join(f"`{name}`" for name in unsupported)
            raise UserInputError(
                f"{flags} does not apply to a {self.name} base model ({'/'.join(self.pipeline_class_names)}); "
                "remove it or use another base model."
            )
        self.options = options

    # -- shapes of the private data the family consumes
    @property
    def resolution(self) -> int:
        """Image side the model generates: the denoiser's latent size times the autoencoder's downsampling."""
        return sample_size(self.denoiser.config) * vae_scale_factor(self.vae)

    #: Whether the denoiser takes inputs of other sizes than the one it was trained on (a UNet does; DiT's position
    #: embedding fixes its size).
    resizable: bool = True

    def set_resolution(self, resolution: int) -> None:
        """Train and sample at ``resolution`` pixels instead of the base model's own (e.g. Stable Diffusion at 256 to
        save compute): the denoiser's configured ``sample_size`` becomes the latent side. Refuses sizes the model
        cannot take (one line naming the sizes that work); its weights are untouched."""
        factor = vae_scale_factor(self.vae)
        if resolution == self.resolution:
            return
        if not self.resizable:
            raise UserInputError(
                f"a {self.name} base model generates {self.resolution}x{self.resolution} images only (its position "
                f"embedding fixes the size): drop `resolution`={resolution}."
            )
        if resolution < factor or resolution % factor:
            raise UserInputError(
                f"`resolution`={resolution} is not a multiple of the autoencoder's downsampling factor {factor}: use "
                f"e.g. {max(factor, resolution // factor * factor)} or {(resolution // factor + 1) * factor}."
            )
        self.denoiser.register_to_config(sample_size=resolution // factor)

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels)

    # -- modules
    @property
    def denoiser(self) -> nn.Module:
        raise NotImplementedError

    @property
    def embedder(self) -> nn.Module | None:
        return None

    def to(self, device) -> ModelFamily:
        self.pipe.to(device)
        return self

    # -- data and loss
    def prepare(self, loaded) -> str | None:
        """Step 1: see the loaded private data set (a ``dp_diffusers.data.LoadedDataset``): :meth:`prepare_data`, then
        :meth:`adopt_labels` with its declared label set. Returns a line for the log (how private classes map onto
        the model's), or None."""
        self.prepare_data(loaded)
        return self.adopt_labels(loaded.id2label)

    def prepare_data(self, loaded) -> None:
        """Part of :meth:`prepare`: read what the family needs from the data set, e.g. a caption column; default:
        nothing to do."""

    def adopt_labels(self, id2label: dict[int, str]) -> str | None:
        """Part of :meth:`prepare`: use the private data's declared class names (and check they fit the model); may
        return a line for the log. Default: nothing to do."""

    def loss_schedule(self) -> dict:
        """The noise schedule and latent scale every family's ``DiffusionLoss`` takes."""
        return {
            "num_train_timesteps": self.noise_scheduler.config.num_train_timesteps,
            "alphas_cumprod": self.noise_scheduler.alphas_cumprod,
            "scaling_factor": latent_scaling_factor(self.vae),
            "prediction_type": self.noise_scheduler.config.prediction_type,
        }

    def encode(self, dataset, *, rows=None, device="cpu", batch_size: int = 256, progress: bool = True):
        """The private set as a ``torch.utils.data.TensorDataset`` of per-example tensors (frozen encoders applied
        once: deterministic per example, so no privacy cost). ``rows``: only these rows of ``dataset``, in order."""
        raise NotImplementedError

    def encoder_fingerprint(self) -> dict:
        """What :meth:`encode`'s output depends on besides the images: the family and its frozen autoencoder's
        weights (keys the private latent cache, ``dp_diffusers.data.latent_cache``)."""
        from ..data.latent_cache import module_fingerprint

        return {"family": self.name, "vae": module_fingerprint(self.vae)}

    def loss_module(self, **kwargs) -> nn.Module:
        """An ``nn.Module`` whose ``forward(*rows)`` takes the encoded tensors of R rows and returns a ``[R]`` loss,
        each row depending on its own example only."""
        raise NotImplementedError

    # -- outputs
    def export_pipeline(self) -> DiffusionPipeline:
        """The pipeline to save, with the trained weights in place (a family may end training here: DiT unties its
        shared label table)."""
        return self.pipe

    def grid_rows(self) -> int:
        """Rows of :meth:`sample_grid` (one per class; 1 for a plain grid)."""
        return 1

    #: Classifier-free guidance of the sample grids when none is given (the family's own choice).
    grid_guidance_scale: float = 1.0

    def grid_guidance(self, guidance_scale: float | None = None) -> float:
        """The guidance a grid is drawn with: ``guidance_scale``, or the family's ``grid_guidance_scale``."""
        return self.grid_guidance_scale if guidance_scale is None else float(guidance_scale)

    def sample_grid(
        self, *, per_class: int, num_inference_steps: int, seed: int, guidance_scale: float | None = None
    ) -> Image.Image:
        """A PNG-ready grid of samples, one row per class, with ``grid_guidance(guidance_scale)``."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Family facts recorded in ``privacy.json`` (JSON-serialisable)."""
        return {"family": self.name, "pipeline_class": type(self.pipe).__name__}

    def usage(self, repo_or_path: str, *, lora: bool = False) -> str:
        """Python that loads and samples the saved model (for the model card); each family writes its own."""
        raise NotImplementedError

    def base_data(self) -> str:
        """The public base model's pre-training data: its ``pretraining.json``, the known-bases table, or its card."""
        from .presets import base_pretraining_data

        path = str(getattr(self.pipe, "name_or_path", "") or "")
        info = Path(path) / "pretraining.json"
        if path and info.is_file():
            return json.loads(info.read_text()).get("public_data", "public data (see the base model's card)")
        return (base_pretraining_data(path) if path else None) or "public data (see the base model's card)"
