"""Refuse, before training, modules whose per-sample gradients Opacus cannot compute correctly.

Opacus 1.6 computes per-sample gradients per *trainable module* (a module owning parameters with
``requires_grad=True``): with a registered grad sampler when its type has one, else with torch.func. The torch.func
fallback only ever sees the module's *first positional input* (``ft_compute_per_sample_gradient`` reads
``activations[0]``), so a custom module with several inputs or keyword arguments would get wrong gradients without
an error. Opacus' own checks (``ModuleValidator`` and ``GradSampleModule.validate``) only run on the whole model and
raise lists of exceptions without module names; this module applies the same rules per named module and adds the
grad-sampler rule, so the error names the module to freeze or replace.
"""

from __future__ import annotations

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserInputError


def _validator_messages(module: nn.Module) -> list[str]:
    validator = ModuleValidator.VALIDATORS.get(type(module))
    if validator is None:
        return []
    return [str(err).split(". ")[0] for err in validator(module)]


def _has_sampler(module: nn.Module, samplers) -> bool:
    """A registered type, or a subclass of one that keeps its ``forward`` (Opacus looks samplers up by exact type
    and sends such subclasses to torch.func, which then computes the same single-input function)."""
    if type(module) in samplers:
        return True
    return any(isinstance(module, base) and type(module).forward is base.forward for base in samplers)


def find_incompatible_modules(module: nn.Module, *, grad_sample_mode: str = "hooks") -> list[tuple[str, str]]:
    """``(qualified name, reason)`` for every module that breaks per-example clipping under ``grad_sample_mode``.

    Frozen modules are fine, with one exception: a BatchNorm in training mode (trainable or not) normalises each
    example with statistics of the whole batch, so one example's gradient depends on the others (per-example
    clipping no longer bounds its influence), and it writes batch statistics of private data into its buffers.
    """
    problems: list[tuple[str, str]] = []
    for name, sub in module.named_modules():
        frozen = not any(p.requires_grad for p in sub.parameters(recurse=False))
        if isinstance(sub, _BatchNorm) and sub.training and sub.track_running_stats and frozen:
            problems.append((name or "<root>", f"{type(sub).__name__} in training mode mixes examples of a batch"))
    samplers = GradSampleModule.GRAD_SAMPLERS
    if grad_sample_mode == "ghost":
        samplers = {**samplers, **GradSampleModuleFastGradientClipping.NORM_SAMPLERS}
    for name, sub in trainable_modules(module):
        label = name or "<root>"
        problems.extend((label, msg) for msg in _validator_messages(sub))
        buffers = [b for b, _ in sub.named_buffers(recurse=False)]
        if buffers:
            problems.append(
                (label, f"{type(sub).__name__} has buffers ({', '.join(buffers)}) Opacus cannot privatise")
            )
        elif grad_sample_mode != "functorch" and not _has_sampler(sub, samplers):
            problems.append(
                (
                    label,
                    f"{type(sub).__name__} owns trainable parameters but has no Opacus grad sampler (the torch.func "
                    "fallback only sees its first positional input)",
                )
            )
        elif grad_sample_mode == "functorch" and isinstance(sub, nn.EmbeddingBag):
            problems.append((label, "EmbeddingBag is not supported by torch.func"))
        if not sub.training:
            problems.append((label, f"{type(sub).__name__} is in eval mode: Opacus records no per-sample gradients"))
    return problems


def check_trainable_modules(module: nn.Module, *, grad_sample_mode: str = "hooks") -> None:
    """Raise :class:`UserInputError` naming the first module Opacus cannot train privately (see above)."""
    problems = find_incompatible_modules(module, grad_sample_mode=grad_sample_mode)
    if not problems:
        return
    name, reason = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserInputError(
        f"Module '{name}' cannot be trained with DP-SGD: {reason}{more}. Freeze its parameters "
        f"(requires_grad=False), replace it (e.g. opacus.validators.ModuleValidator.fix), call model.train(), or "
        f"register a grad sampler (opacus.grad_sample.register_grad_sampler)."
    )
