"""What the training script needs from a model family; nothing here knows of Opacus."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DiffusionPipeline
from PIL import Image
from torch import nn


class ModelFamily:
    """A public diffusers pipeline seen as: frozen encoder + trainable denoiser/embedder + a per-example loss.

    Subclasses set ``name``, ``pipeline_class``, ``pipeline_class_names`` (model_index ``_class_name`` values they
    load) and implement the methods below. ``denoiser`` is searched for attention blocks; ``embedder`` (or None) is the
    conditioning embedder trained beside them.
    """

    name: str = ""
    pipeline_class: type[DiffusionPipeline] = DiffusionPipeline
    pipeline_class_names: tuple[str, ...] = ()
    needs_labels: bool = True

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> ModelFamily:
        return cls(cls.pipeline_class.from_pretrained(path, **kwargs))

    # -- shapes of the private data the family consumes
    @property
    def resolution(self) -> int:
        raise NotImplementedError

    @property
    def channels(self) -> int:
        raise NotImplementedError

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
    def adopt_labels(self, id2label: dict[int, str]) -> None:
        """Use the private data's class names (and check its labels fit); default: nothing to do."""

    def encode(self, dataset, *, device="cpu", batch_size: int = 256, progress: bool = True):
        """The private set as a ``torch.utils.data.TensorDataset`` of per-example tensors (frozen encoders applied
        once: deterministic per example, so no privacy cost)."""
        raise NotImplementedError

    def loss_module(self, **kwargs) -> nn.Module:
        """An ``nn.Module`` whose ``forward(*rows)`` takes the encoded tensors of R rows and returns a ``[R]`` loss,
        each row depending on its own example only."""
        raise NotImplementedError

    # -- outputs
    def pipeline(self) -> DiffusionPipeline:
        return self.pipe

    def sample_grid(self, *, per_class: int, num_inference_steps: int, seed: int) -> Image.Image:
        raise NotImplementedError

    def base_data(self) -> str:
        """The public base model's pre-training data, as its ``pretraining.json`` or card says."""
        path = Path(str(getattr(self.pipe, "name_or_path", "") or ""))
        info = path / "pretraining.json"
        if info.is_file():
            return json.loads(info.read_text()).get("public_data", "public data (see the base model's card)")
        return "public data (see the base model's card)"
