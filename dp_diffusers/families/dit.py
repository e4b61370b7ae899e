"""Class-conditional diffusion transformers (``DiTPipeline``: ``DiTTransformer2DModel`` + ``AutoencoderKL``).

What trains: the self-attention (``attn1``: q/k/v/out) of every transformer block, plus the label embedding.

The label embedding, deliberately. The DiT paper has ONE label table (``y_embedder``); diffusers' conversion copies it
into every block's ``AdaLayerNormZero`` (``transformer_blocks.i.norm1.emb.class_embedder``, 1,001 x 1,152 in
DiT-XL/2, identical in all 28 blocks). Training 28 copies would put 28x the parameters (and DP noise) on one
function, and let the copies drift apart. Instead the copies are *tied* during training to one compact table of
``n + 1`` rows (the private classes plus the null class of classifier-free guidance): the family's ``embedder``.
The per-block copies are excluded from the attention selection (they sit outside ``Attention``) and replaced, while
training, by a proxy that reads the compact table. On save the trained rows are written back into every block's
copy at the model's class ids, so the output is a stock DiT with a 1,000-class (+ null) table:
``DiTPipeline.from_pretrained`` loads it, and guidance (which hard-codes the null id 1000) keeps working. Rows of
classes the private data does not use stay bit-identical.

Label mapping: private class ``i`` becomes the model's class ``label_map[i]``. With ``--label_map`` (e.g. CIFAR-10's
cat -> ImageNet 281 "tabby cat") the row starts from that class's pre-trained embedding, so the model starts from
related knowledge. Without it, private class ``i`` takes the model's class id ``i`` and its row is *re-initialised*
to the mean of all pre-trained class rows: a neutral start that stays in the distribution the frozen adaLN layers
were trained on (a random row would not), without pretending that ImageNet's class ``i`` (a tench, a goldfish..)
means anything for the private class. Either way the output's ``id2label`` names those ids with the private
names, and ``pipe.get_label_ids`` finds them.

DiT predicts a learned variance too (``out_channels = 2 x in_channels``): the loss uses only the epsilon half, and
``DiTPipeline`` samples with the epsilon half only.
"""

from __future__ import annotations

import logging

import torch
from diffusers import DiTPipeline
from torch import nn

from ..errors import UserInputError
from .base import ModelFamily
from .common import LabelConditionalLoss, encode_images, plain_grid

logger = logging.getLogger(__name__)


class DiTLabelTable(nn.Module):
    """The trained label embedding: ``n`` private classes + the null class (row ``n``), one ``nn.Embedding``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embedding_table = nn.Embedding(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.embedding_table.weight.copy_(weight)
        self.precomputed: torch.Tensor | None = None  # set by DiTLoss for the duration of one forward

    @property
    def null_class_id(self) -> int:
        return self.embedding_table.num_embeddings - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class _TiedLabelEmbedding(nn.Module):
    """Stands in for a block's ``LabelEmbedding`` while training: reads the shared compact table (held without
    registering it, so the transformer does not own it twice) and never drops labels itself (the loss does).

    Inside :class:`DiTLoss` the table runs once per forward and every block reuses that embedding
    (``table.precomputed``): one per-sample gradient instead of one per block, and no parameter tying, which
    Opacus' ghost clipping refuses."""

    def __init__(self, original: nn.Module, table: DiTLabelTable):
        super().__init__()
        self.original = original  # kept (frozen, unused) so that the transformer's parameter count is unchanged
        object.__setattr__(self, "_table", table)
        self.num_classes = table.null_class_id
        self.dropout_prob = 0.0

    def forward(self, labels: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(torch.as_tensor(force_drop_ids == 1, device=labels.device), self.num_classes, labels)
        elif self._table.precomputed is not None and self._table.precomputed.shape[0] == labels.shape[0]:
            return self._table.precomputed
        return self._table(labels)


class DiTLoss(LabelConditionalLoss):
    """Per-row epsilon loss of a DiT, shape ``[R]``: the learned-variance half of the output is ignored."""

    def __init__(self, transformer: nn.Module, embedder: DiTLabelTable, **kwargs):
        super().__init__(embedder, **kwargs)  # registered here: the loss module owns the trained table
        self.transformer = transformer

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.embedder.precomputed = self.embedder(labels)  # once; every block (and the final layer) reuses it
        try:
            pred = self.transformer(noisy, timestep=timesteps, class_labels=labels).sample
        finally:
            self.embedder.precomputed = None
        channels = noisy.shape[1]
        return pred[:, :channels] if pred.shape[1] == 2 * channels else pred  # learn_sigma: [epsilon, variance]


class DiTFamily(ModelFamily):
    """The ``DiTPipeline`` family: denoiser ``transformer`` (its ``Attention`` modules train), embedder: the tied
    compact label table (see the module docstring), frozen ``vae``."""

    resizable = False

    name = "dit"
    pipeline_class = DiTPipeline
    pipeline_class_names = ("DiTPipeline",)
    attention_block_classes = ("Attention",)
    supported_options = frozenset({"label_map"})
    description = "A class-conditional diffusion transformer (DiT)"

    def __init__(self, pipe: DiTPipeline):
        super().__init__(pipe)
        self.transformer = pipe.transformer
        self._embeddings = [block.norm1.emb for block in self.transformer.transformer_blocks]
        self._originals = [emb.class_embedder for emb in self._embeddings]
        self._table: DiTLabelTable | None = None
        self._model_ids: list[int] = []
        self._private_names: dict[int, str] = {}
        self._tied = False

    # -- shapes and modules
    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def embedder(self) -> DiTLabelTable | None:
        return self._table

    @property
    def num_model_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def label_map(self) -> dict[int, int]:
        """Private class id -> the model's class id (empty before :meth:`adopt_labels`)."""
        return dict(enumerate(self._model_ids))

    # -- labels
    def _base_id2label(self) -> dict[int, str]:
        raw = getattr(self.pipe.config, "id2label", None) or {}
        return {int(k): str(v) for k, v in raw.items()}

    def adopt_labels(self, id2label: dict[int, str]) -> None:
        n, classes = len(id2label), self.num_model_classes
        if n == 0:
            raise UserInputError("A DiT model needs labelled private data: pass `label_column`.")
        if n > classes:
            raise UserInputError(
                f"The private data has {n} classes but the base DiT has {classes}: use a base model with more classes."
            )
        mapping = self.options.label_map
        if mapping is not None and sorted(mapping) != list(range(n)):
            raise UserInputError(
                f"`label_map` must map every private label id 0..{n - 1} exactly once (got ids {sorted(mapping)})."
            )
        if mapping is not None and (
            len(set(mapping.values())) != n or not all(0 <= v < classes for v in mapping.values())
        ):
            raise UserInputError(
                "`label_map` must map the private labels onto distinct class ids of the model, within "
                f"0..{classes - 1}."
            )
        weight = self._originals[0].embedding_table.weight.detach()
        if weight.shape[0] != classes + 1:
            raise UserInputError("This DiT's label table has no null class row: it cannot be fine-tuned here.")
        if any(not torch.equal(o.embedding_table.weight, weight) for o in self._originals[1:]):
            logger.warning(
                "The per-block label tables of this DiT differ; training ties them to block 0's rows (a converted "
                "DiT checkpoint has identical copies)."
            )
        self._model_ids = [mapping[i] for i in range(n)] if mapping is not None else list(range(n))
        if mapping is not None:
            rows = weight[self._model_ids]
        else:
            rows = weight[:classes].mean(0, keepdim=True).expand(n, -1)
        self._private_names = dict(id2label)
        names = self._base_id2label()
        for i, model_id in enumerate(self._model_ids):
            was = f" ({names[model_id]!r})" if model_id in names else ""
            logger.info(f"private class {i} {id2label[i]!r} -> model class {model_id}{was}")
        self._table = DiTLabelTable(torch.cat([rows, weight[classes:]]).clone()).to(weight.device)
        self._tie()

    def _tie(self) -> None:
        for emb, original in zip(self._embeddings, self._originals, strict=True):
            emb.class_embedder = _TiedLabelEmbedding(original, self._table)
        self._tied = True

    def _untie(self) -> None:
        """Write the trained rows into every block's own table (at the model's class ids) and put those back."""
        if not self._tied:
            return
        classes = self.num_model_classes
        ids = torch.tensor([*self._model_ids, classes], device=self._table.embedding_table.weight.device)
        with torch.no_grad():
            for emb, original in zip(self._embeddings, self._originals, strict=True):
                table = original.embedding_table.weight
                table[ids.to(table.device)] = self._table.embedding_table.weight.to(table.device, table.dtype)
                emb.class_embedder = original
        names = self._base_id2label()
        names.update({model_id: self._private_names[i] for i, model_id in enumerate(self._model_ids)})
        self.pipe.register_to_config(id2label={int(k): v for k, v in sorted(names.items())})
        self.pipe.labels = {}
        for key, value in names.items():
            for label in value.split(","):
                self.pipe.labels[label.strip()] = int(key)
        self._tied = False

    # -- data and loss
    def encode(self, dataset, *, rows=None, device="cpu", batch_size: int = 256, progress: bool = True):
        latents, labels = encode_images(
            self.vae, dataset, rows=rows, batch_size=batch_size, device=device, progress=progress
        )
        if labels.numel() and labels.min() < 0:
            raise UserInputError("A DiT model needs labels for every private image: pass `label_column`.")
        return torch.utils.data.TensorDataset(*latents, labels)

    def loss_module(self, *, cond_drop_prob: float = 0.0) -> DiTLoss:
        if self._table is None:
            raise RuntimeError("adopt_labels() builds the label table: call it before loss_module().")
        return DiTLoss(self.transformer, self._table, cond_drop_prob=cond_drop_prob, **self.loss_schedule())

    # -- outputs
    def export_pipeline(self) -> DiTPipeline:
        """The stock ``DiTPipeline`` with the trained rows written back (ends training: the proxies are removed)."""
        self._untie()
        return self.pipe

    def grid_rows(self) -> int:
        return len(self._model_ids) or min(4, self.num_model_classes)

    def grid_guidance(self, guidance_scale: float | None = None) -> float:
        return 1.0  # while training, the null class is not at id 1000

    def sample_grid(self, *, per_class: int, num_inference_steps: int, seed: int, guidance_scale: float | None = None):
        """One row per private class, always without guidance: while training, the null class is not at id 1000."""
        self.pipe.set_progress_bar_config(disable=True)
        n = len(self._model_ids)
        ids = list(range(n)) if self._tied else self._model_ids
        if not ids:
            ids = list(range(min(4, self.num_model_classes)))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = self.pipe(
            class_labels=[i for i in ids for _ in range(per_class)],
            guidance_scale=1.0,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pil",
        ).images
        return plain_grid(images, cols=per_class)

    def describe(self) -> dict:
        info = super().describe()
        info["label_map"] = {str(i): model_id for i, model_id in enumerate(self._model_ids)}
        info["label_rows"] = "from --label_map" if self.options.label_map is not None else "re-initialised (mean row)"
        info["per_block_label_tables"] = "tied to one trained table, written back into every block"
        return info

    def usage(self, repo_or_path: str, *, lora: bool = False) -> str:
        first = next(iter(self._private_names.values()), "my class")
        return (
            f'from diffusers import DiTPipeline\n\npipe = DiTPipeline.from_pretrained("{repo_or_path}")\n'
            f'ids = pipe.get_label_ids(["{first}"])  # the private class names (see pipe.labels)\n'
            "images = pipe(class_labels=ids, num_inference_steps=50, guidance_scale=1.0).images"
        )
