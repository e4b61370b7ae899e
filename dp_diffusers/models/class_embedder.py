"""The conditioning embedder of the class-conditional LDM: class id -> a short sequence of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

# diffusers records a third-party component's defining module in model_index.json and, when loading, checks the
# class against ``getattr(that_module, "ModelMixin")``: this module must bind the name ``ModelMixin``.
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import UserInputError


class ClassEmbedder(ModelMixin, ConfigMixin):
    r"""Maps class ids to ``num_tokens`` tokens of width ``embed_dim`` for the UNet's cross-attention.

    Id ``num_classes`` is the *null class* used for classifier-free guidance.

    Why several tokens: with a single token, the softmax in cross-attention is identically 1, so ``attn2.to_q``
    and ``attn2.to_k`` receive exactly zero gradient; under DP-SGD they would collect pure noise. Each class
    therefore owns ``num_tokens`` distinct tokens (one embedding row of width ``num_tokens * embed_dim``), so
    attention weights between them depend on the query and every trained projection matters.

    The whole module is one ``nn.Embedding`` (no hand-written layer), for which Opacus computes per-sample
    gradients.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        embed_dim: int = 128,
        num_tokens: int = 4,
        id2label: dict[int, str] | None = None,
    ):
        super().__init__()
        if id2label is not None and (
            not 0 < len(id2label) <= num_classes or not all(0 <= int(k) < num_classes for k in id2label)
        ):
            raise ValueError(f"id2label must name 1..{num_classes} of the ids 0..{num_classes - 1}, got {id2label}.")
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * embed_dim)
        nn.init.normal_(self.embedding.weight, std=embed_dim**-0.5)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def id2label(self) -> dict[int, str]:
        # ConfigMixin stores dict keys as strings after a JSON round trip.
        mapping = self.config.id2label or {i: str(i) for i in range(self.config.num_classes)}
        return {int(k): str(v) for k, v in mapping.items()}

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def resolve_labels(self, labels: Sequence[int | str] | int | str) -> list[int]:
        """Turns ints and label names into class ids; raises a one-line ``UserInputError`` for unknown ones."""
        if isinstance(labels, (int, str)) or (hasattr(labels, "ndim") and labels.ndim == 0):
            labels = [labels]
        label2id, n = self.label2id, self.config.num_classes
        ids = []
        for label in labels:
            if isinstance(label, str):
                key = label if label in label2id else None
                if key is None and label.strip().isdigit() and int(label) < n:
                    ids.append(int(label))
                    continue
                if key is not None:
                    ids.append(label2id[key])
                    continue
            elif not isinstance(label, bool) and hasattr(label, "__index__") and 0 <= int(label) < n:
                ids.append(int(label))
                continue
            known = ", ".join(repr(v) for _, v in sorted(self.id2label.items()))
            raise UserInputError(f"Unknown class {label!r}: use an id in 0..{n - 1} or one of the names {known}.")
        return ids

    def forward(self, class_labels: torch.LongTensor) -> torch.Tensor:
        """``class_labels``: ``[B]`` ids (``num_classes`` = null class). Returns ``[B, num_tokens, embed_dim]``."""
        tokens = self.embedding(class_labels)
        return tokens.view(class_labels.shape[0], self.config.num_tokens, self.config.embed_dim)
