"""Which parameters train: the paper's attention blocks (+ the conditioning embedder), a narrower or a wider choice,
as full weights or as LoRA adapters. One selection serves both: :func:`select_modules` picks modules (peft-style
``target_modules`` matching, :func:`matches_target`), and :func:`select_trainable` unfreezes them or puts LoRA
adapters on their linear layers (``lora.py``).

peft's own matcher (``check_target_module_exists``) serves adapter injection only; unfreezing *existing* parameters
is selected here with the same semantics (a regex full match, or a list of name suffixes).
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
#: The named choices of what trains (SCOPES, in this order) and what each trains, in words (the privacy card's
#: "trained parameters").
SCOPE_DESCRIPTIONS = {
    "attention_blocks": "the attention blocks",
    "attention_projections": "the attention projections",
    "attention_up_resnets": "the attention blocks and the ResNet blocks of the up (decoder) path",
    "full": "every denoiser parameter",
}
SCOPES = tuple(SCOPE_DESCRIPTIONS)
RESNET_CLASS_NAMES = ("ResnetBlock2D",)
_UP_PATH = ("up_blocks", "output_blocks")
DEFAULT_LORA_RANK = 4
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
    """What to fine-tune on private data; everything else is frozen (``requires_grad=False``).

    Conflicting choices are refused here, as peft's ``LoraConfig`` refuses its own."""

    scope: str | None = field(
        default=None,
        metadata={
            "help": "'attention_blocks': whole attention blocks (norm, proj_in, transformer blocks, proj_out), "
            "the paper's choice and the default; 'attention_projections': only the q/k/v/out projections inside "
            "them (the default, and the only choice, with use_lora); 'attention_up_resnets': the attention blocks "
            "plus the ResNet blocks of the UNet's up (decoder) path; 'full': every parameter of the denoiser."
        },
    )
    attention_layers: str | None = field(
        default=None,
        metadata={"help": "Attention blocks to train in the paper's 1..L forward numbering, e.g. '3-7' or '1,5-7'."},
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "As in peft: a regex matched against full module names, or a list of name suffixes. Chooses "
            "the modules by itself: not together with scope or attention_layers."
        },
    )
    train_embedder: bool = field(default=True, metadata={"help": "Also train the conditioning embedder (fully)."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the selected linear layers instead of their weights."},
    )
    lora_rank: int | None = field(
        default=None, metadata={"help": f"LoRA rank r (with use_lora; default {DEFAULT_LORA_RANK})."}
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha, the scale being alpha / r (with use_lora; default: the rank)."}
    )

    def __post_init__(self):
        if self.scope is not None and self.scope not in SCOPES:
            raise UserInputError(f"Unknown `scope` {self.scope!r}: use one of {', '.join(SCOPES)}.")
        if self.target_modules and (self.scope is not None or self.attention_layers):
            given = " and ".join(f"`{n}`" for n in ("scope", "attention_layers") if getattr(self, n) not in (None, ""))
            raise UserInputError(
                f"`target_modules` chooses the modules by itself; {given} would be ignored: give one or the other."
            )
        if self.scope == "full" and self.attention_layers:
            raise UserInputError(
                "`attention_layers` picks attention blocks, but scope 'full' trains every parameter of the denoiser: "
                "give one or the other."
            )
        if self.use_lora:
            if self.scope not in (None, "attention_projections"):
                raise UserInputError(
                    f"`use_lora` puts adapters on the attention projections, but `scope` {self.scope!r} trains full "
                    "weights: drop the scope (or `use_lora`)."
                )
            if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or self.lora_rank < 1):
                raise UserInputError(f"`lora_rank` must be a positive integer, got {self.lora_rank}.")
        elif self.lora_rank is not None or self.lora_alpha is not None:
            raise UserInputError(
                "`lora_rank` and `lora_alpha` apply to LoRA adapters only: add `use_lora`, or drop them."
            )

    @property
    def resolved_scope(self) -> str | None:
        """The scope that applies (None when ``target_modules`` chooses)."""
        if self.target_modules:
            return None
        return self.scope or ("attention_projections" if self.use_lora else "attention_blocks")

    @property
    def rank(self) -> int:
        return self.lora_rank or DEFAULT_LORA_RANK


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
            f"`attention_layers`={spec!r} is not a range within 1..{num_layers} (this model has {num_layers} "
            f"attention blocks); use e.g. '{max(1, num_layers // 2)}-{num_layers}'."
        ) from None
    return sorted(chosen)


def matches_target(name: str, target: str | list[str]) -> bool:
    """peft's ``target_modules`` semantics: a string is a regex that must match the whole module name; a list
    matches a name equal to one of its items or ending with ``"." + item``."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _projections(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The q/k/v/out projections of the self- and cross-attention inside each block (or a bare Attention block's)."""
    chosen = [
        (f"{bn}.{n}", m)
        for bn, b in blocks
        for n, m in b.named_modules()
        if n and matches_target(n, list(PROJECTIONS)) and any(a in n.split(".") for a in ("attn1", "attn2"))
    ]
    return chosen or [(f"{bn}.{n}", m) for bn, b in blocks for n, m in b.named_modules() if n in PROJECTIONS]


def _up_resnets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ResNet blocks of a UNet's up (decoder) path."""
    found = [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__ in RESNET_CLASS_NAMES and any(p in n.split(".") for p in _UP_PATH)
    ]
    if not found:
        raise UserInputError(f"{type(model).__name__} has no ResNet blocks in an up path: use another `scope`.")
    return found


def select_modules(
    model: nn.Module, *, config: TrainableConfig, block_classes: tuple[str, ...] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``config`` selects, with their full names: the one selection that full
    fine-tuning (their parameters) and LoRA (their linear layers) both consume. ``block_classes``: the attention
    block classes to search (see :func:`attention_blocks`)."""
    if config.target_modules:
        chosen = [(n, m) for n, m in model.named_modules() if n and matches_target(n, config.target_modules)]
        if not chosen:
            raise UserInputError(f"`target_modules`={config.target_modules!r} matches no module of the model.")
        return chosen
    scope = config.resolved_scope
    if scope == "full":
        return [("", model)]
    blocks = attention_blocks(model, block_classes)
    if not blocks:
        searched = ", ".join(block_classes or BLOCK_CLASS_NAMES)
        raise UserInputError(f"{type(model).__name__} has no attention blocks ({searched}).")
    if config.attention_layers:
        blocks = [blocks[i - 1] for i in parse_layer_range(config.attention_layers, len(blocks))]
    if scope == "attention_blocks":
        return blocks
    if scope == "attention_up_resnets":
        return sorted(blocks + _up_resnets(model), key=lambda nm: _forward_key(nm[0]))
    chosen = _projections(blocks)
    if not chosen:
        raise UserInputError("The selected attention blocks have no to_q/to_k/to_v/to_out.0 projections.")
    return chosen


def select_trainable(
    model: nn.Module,
    *,
    config: TrainableConfig | None = None,
    embedder: nn.Module | None = None,
    block_classes: tuple[str, ...] | None = None,
) -> TrainableReport:
    """Freezes ``model`` (and ``embedder``) except what ``config`` selects: those modules' parameters, or with
    ``config.use_lora`` LoRA adapters on their linear layers (``lora.add_lora_adapters``); the embedder trains fully
    unless ``config.train_embedder`` is False. Returns the counts and the trained modules' names (base parameters
    only in the total: LoRA adapters are new)."""
    config = config or TrainableConfig()
    chosen = select_modules(model, config=config, block_classes=block_classes)
    model.requires_grad_(False)
    if config.use_lora:
        from .lora import add_lora_adapters

        targets = [n for n, m in chosen if isinstance(m, nn.Linear)]
        if not targets:
            raise UserInputError("The selected modules have no linear layers to put LoRA adapters on.")
        add_lora_adapters(model, targets, rank=config.rank, alpha=config.lora_alpha)
        names = targets
    else:
        for _, module in chosen:
            module.requires_grad_(True)
        names = [n or f"{type(model).__name__} (every parameter)" for n, _ in chosen]
    parts = [model] + ([embedder] if embedder is not None else [])
    if embedder is not None:
        embedder.requires_grad_(config.train_embedder)
        if config.train_embedder:
            names.append("embedder")
    total = sum(p.numel() for part in parts for n, p in part.named_parameters() if ".lora_" not in n)
    trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
    return TrainableReport(trainable=trainable, total=total, modules=names)
