"""LoRA on the attention projections, trained privately through the same engine, saved the diffusers way.

``add_lora_adapters`` puts peft LoRA adapters (``lora_A`` / ``lora_B``: plain ``nn.Linear`` layers, for which
Opacus' hooks compute per-sample gradients) on the linear layers that ``trainable.select_modules`` chose (by default
``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of the attention blocks); ``trainable.select_trainable(config=
TrainableConfig(use_lora=True))`` calls it. Only the adapters (and the embedder) are DP-trained; every base weight
stays bit-identical.

``save_pipeline_with_lora`` writes the pipeline with its base weights (adapters removed) plus
``pytorch_lora_weights.safetensors`` in diffusers' format (``get_peft_model_state_dict`` +
``convert_state_dict_to_diffusers`` + ``save_lora_weights``), so ``pipe.load_lora_weights(folder)`` applies them.
Pipelines without a diffusers LoRA loader (``DiTPipeline``, ``LDMPipeline`` in diffusers 0.42) are saved with the
adapters *merged* into the projections (a stock pipeline), and the adapters alone in ``dp_lora_adapter.safetensors``
(peft format).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

ADAPTER = "default"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MERGED_ADAPTER_FILE = "dp_lora_adapter.safetensors"


def add_lora_adapters(model: nn.Module, targets: list[str], *, rank: int, alpha: float | None = None) -> None:
    """Put LoRA adapters of ``rank`` on the linear layers named ``targets`` (full names) and make only them
    trainable. The diffusers way (``train_text_to_image_lora.py``): ``model.add_adapter(LoraConfig(...))``; models
    without diffusers' ``PeftAdapterMixin`` (DiT's transformer, ``UNet2DModel`` in diffusers 0.42) get the same
    injection from peft directly."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():  # only the adapters train
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_config_of(model: nn.Module) -> LoraConfig:
    return model.peft_config[ADAPTER]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's format (``<module>.lora_A.weight``), detached on the CPU."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, LoraLayer]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    return found


@contextlib.contextmanager
def lora_swapped_out(model: nn.Module, *, merge: bool):
    """Temporarily replace every LoRA layer by its base layer (``merge=False``: the bit-identical base weights) or by
    a copy with the adapter merged in (``merge=True``); the adapters are put back afterwards."""
    layers = _lora_layers(model)
    try:
        for parent, attr, layer in layers:
            base = layer.get_base_layer()
            if merge:
                base = copy.deepcopy(base)
                with torch.no_grad():
                    base.weight += layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
            setattr(parent, attr, base)
        yield model
    finally:
        for parent, attr, layer in layers:
            setattr(parent, attr, layer)


def _component_name(pipe, module: nn.Module) -> str | None:
    return next((name for name, value in pipe.components.items() if value is module), None)


def save_pipeline_with_lora(pipe, directory: str | Path, denoiser: nn.Module) -> dict:
    """Save ``pipe`` with the LoRA adapters of ``denoiser`` (see the module docstring); returns what was written."""
    directory = Path(directory)
    state = lora_state_dict(denoiser)
    lora_config = lora_config_of(denoiser)
    info = {"rank": int(lora_config.r), "alpha": float(lora_config.lora_alpha), "adapted_modules": len(state) // 2}
    component = _component_name(pipe, denoiser)
    if component == "unet" and hasattr(type(pipe), "save_lora_weights"):
        from diffusers.utils import convert_state_dict_to_diffusers

        with lora_swapped_out(denoiser, merge=False):
            pipe.save_pretrained(directory)
        metadata = lora_config.to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        type(pipe).save_lora_weights(
            directory,
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata=metadata,
        )
        info.update(format="diffusers", weights=LORA_WEIGHTS, load="pipe.load_lora_weights(folder)")
        return info
    with lora_swapped_out(denoiser, merge=True):
        pipe.save_pretrained(directory)
    save_file(state, str(directory / MERGED_ADAPTER_FILE))
    info.update(
        format="merged",
        weights=MERGED_ADAPTER_FILE,
        load=f"merged into {component or 'the denoiser'}; the adapters alone are in {MERGED_ADAPTER_FILE}",
    )
    return info
