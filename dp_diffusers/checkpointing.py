"""Training checkpoints: trained tensors as safetensors, the rest (optimizer, accountant, EMA, RNG, step) as a torch
file read back with ``weights_only=True``. Written atomically; a checkpoint directory is complete or absent.

Accelerate's ``save_state`` is not used: with DP the model, optimizer and loader are not ``accelerator.prepare``-d
(Opacus wraps them), and the accountant's history must travel with the weights.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory
from .errors import UserInputError

TRAINED = "trained.safetensors"
EMA = "ema.safetensors"
STATE = "state.pt"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Path,
    *,
    trained: dict[str, torch.Tensor],
    state: dict,
    ema: dict[str, torch.Tensor] | None = None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Writes ``directory`` atomically: ``trained`` tensors, optional ``ema`` tensors, and ``state``."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, tmp / TRAINED)
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / EMA)
        torch.save({**state, "rng": rng_states or [rng_state()]}, tmp / STATE)
    return Path(directory)


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """Returns ``(trained, ema or None, state)``; tensors from safetensors, state with ``weights_only=True``."""
    directory = Path(directory)
    if not (directory / STATE).is_file() or not (directory / TRAINED).is_file():
        raise UserInputError(f"{directory} is not a complete checkpoint ({STATE} and {TRAINED} are needed).")
    trained = load_file(directory / TRAINED)
    ema = load_file(directory / EMA) if (directory / EMA).is_file() else None
    state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    return trained, ema, state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(output_dir: str | Path, spec: str | None) -> Path | None:
    """``latest`` -> the newest checkpoint under ``output_dir`` (or None); a path -> that checkpoint."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise UserInputError(f"`resume_from_checkpoint`={spec!r}: no such checkpoint folder (or use 'latest').")
    return path


def prune_checkpoints(output_dir: str | Path, *, keep: int | None) -> None:
    """Keeps the ``keep`` newest checkpoints (None: keep all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
