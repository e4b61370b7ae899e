"""Which parameters train: the paper's attention blocks (+ the conditioning embedder), or a narrower choice.

peft's ``target_modules`` matching (regex full match, or a list of name suffixes) is reused in spirit, but peft's
matcher only applies to adapter injection, so selecting *existing* parameters to unfreeze is done here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import UserInputError

# Attention "blocks" by family, most specific first: the UNet's CompVis SpatialTransformer (Transformer2DModel),
# a transformer's blocks (DiT: BasicTransformerBlock), then bare Attention modules (UNet2DModel's AttnDownBlock2D).
BLOCK_CLASS_NAMES = ("Transformer2DModel", "BasicTransformerBlock", "Attention")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_STAGE_ORDER = {
    "conv_in": 0,
    "down_blocks": 1,
    "input_blocks": 1,
    "transformer_blocks": 1,
    "mid_block": 2,
    "middle_block": 2,
    "up_blocks": 3,
    "output_blocks": 3,
}


@dataclass
class TrainableConfig:
    """What to fine-tune on private data; everything else is frozen (``requires_grad=False``)."""

    scope: str = field(
        default="attention_blocks",
        metadata={
            "help": "'attention_blocks': whole attention blocks (norm, proj_in, transformer blocks, proj_out), "
            "the paper's choice; 'attention_projections': only the q/k/v/out projections inside them."
        },
    )
    attention_layers: str | None = field(
        default=None,
        metadata={"help": "Attention blocks to train in the paper's 1..L forward numbering, e.g. '3-7' or '1,5-7'."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "As in peft: a regex matched against full module names, or a list of name suffixes. "
            "Overrides scope and attention_layers."
        },
    )
    train_embedder: bool = field(default=True, metadata={"help": "Also train the conditioning embedder."})


@dataclass
class TrainableReport:
    trainable: int
    total: int
    modules: list[str]

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.2f}"
        )


def _forward_key(name: str) -> tuple:
    """Orders module names as a UNet runs them: down blocks, mid block, up blocks; indices numerically."""
    parts = name.split(".")
    stage = next((_STAGE_ORDER[p] for p in parts if p in _STAGE_ORDER), 4)
    return (stage, [int(p) if p.isdigit() else -1 for p in parts], name)


def attention_blocks(model: nn.Module, block_classes: tuple[str, ...] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's attention blocks in forward order (the paper's numbering is this list's 1-based index).

    ``block_classes``: class names to search, most specific first (default ``BLOCK_CLASS_NAMES``); a model family
    narrows it, e.g. DiT to its ``Attention`` modules (its ``BasicTransformerBlock`` is the whole transformer)."""
    for class_name in block_classes or BLOCK_CLASS_NAMES:
        found = [(n, m) for n, m in model.named_modules() if type(m).__name__ == class_name]
        # Keep outermost blocks only (a Transformer2DModel contains Attention modules).
        found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
        if found:
            return sorted(found, key=lambda nm: _forward_key(nm[0]))
    return []


def parse_layer_range(spec: str, num_layers: int) -> list[int]:
    """'3-7' or '1,5-7' -> sorted 1-based indices; validated against ``num_layers``."""
    chosen: set[int] = set()
    try:
        for part in spec.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not 1 <= lo_i <= hi_i <= num_layers:
                raise ValueError
            chosen.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise UserInputError(
            f"--attention_layers={spec!r} is not a range within 1..{num_layers} (this model has {num_layers} "
            f"attention blocks); use e.g. '{max(1, num_layers // 2)}-{num_layers}'."
        ) from None
    return sorted(chosen)


def _matches(name: str, target: str | list[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def select_trainable(
    model: nn.Module,
    *,
    config: TrainableConfig | None = None,
    embedder: nn.Module | None = None,
    block_classes: tuple[str, ...] | None = None,
) -> TrainableReport:
    """Freezes ``model`` (and ``embedder``) except the selected parameters; returns counts and module names.

    ``block_classes``: the attention block classes to search (see :func:`attention_blocks`)."""
    config = config or TrainableConfig()
    model.requires_grad_(False)
    chosen: list[tuple[str, nn.Module]]
    if config.target_modules:
        chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, config.target_modules)]
        if not chosen:
            raise UserInputError(f"--target_modules={config.target_modules!r} matches no module of the model.")
    else:
        blocks = attention_blocks(model, block_classes)
        if not blocks:
            searched = ", ".join(block_classes or BLOCK_CLASS_NAMES)
            raise UserInputError(f"{type(model).__name__} has no attention blocks ({searched}).")
        if config.attention_layers:
            keep = parse_layer_range(config.attention_layers, len(blocks))
            blocks = [blocks[i - 1] for i in keep]
        if config.scope == "attention_blocks":
            chosen = blocks
        elif config.scope == "attention_projections":
            chosen = [
                (f"{bn}.{n}", m)
                for bn, b in blocks
                for n, m in b.named_modules()
                if n and _matches(n, list(PROJECTIONS)) and any(a in n.split(".") for a in ("attn1", "attn2"))
            ]
            if not chosen:  # a bare Attention block: its own projections
                chosen = [(f"{bn}.{n}", m) for bn, b in blocks for n, m in b.named_modules() if n in PROJECTIONS]
        else:
            raise UserInputError(
                f"Unknown trainable scope {config.scope!r}: use attention_blocks or attention_projections."
            )
    for _, module in chosen:
        module.requires_grad_(True)
    names = [n for n, _ in chosen]
    total = sum(p.numel() for p in model.parameters())
    if embedder is not None:
        embedder.requires_grad_(config.train_embedder)
        total += sum(p.numel() for p in embedder.parameters())
        if config.train_embedder:
            names.append("embedder")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if embedder is not None:
        trainable += sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    return TrainableReport(trainable=trainable, total=total, modules=names)
