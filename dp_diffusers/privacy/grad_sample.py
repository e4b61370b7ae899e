"""Opacus' hooks-based per-sample gradients, with exact shortcuts that Opacus 1.6 does not take.

``DPGradSampleModule`` is Opacus' ``GradSampleModule`` (same hooks, same registered grad samplers, same
``grad_sample`` contract for ``DPOptimizer``) with a forward pre-hook added (item 4) and a backward hook,
``capture_backprops_hook``, that is otherwise Opacus' own, line for line: it calls the pieces named below (items
1-3). Layer-specific pieces are registered per layer type, as Opacus' ``grad_sample/linear.py`` registers its
samplers: :data:`NOISE_ROW_FOLDS` (item 2) and :data:`BOOKKEEPING_SAMPLERS` (item 3).

1. **No zero-fill + copy** (:func:`_store_without_copy`). Opacus' ``create_or_accumulate_grad_sample`` allocates a
   zero ``[max_batch_len, ...]`` buffer and copies each layer's per-sample gradients into it, even when they arrive
   in one piece of exactly ``max_batch_len`` rows, which is every layer here (no RNNs, no packed sequences). That
   doubles the memory traffic of the per-sample gradients (``B x trained parameters`` floats per physical batch),
   which is the DP overhead on CPU. When the first gradient of a parameter in a backward pass is a fresh, contiguous
   tensor of ``max_batch_len`` rows that owns its storage, it is kept as is; every other case (tied parameters,
   tensors that share memory with the layer's inputs, short batches) takes Opacus' path.
2. **Noise multiplicity folded into the grad sampler** (:meth:`DPGradSampleModule._fold_noise_rows`, with the
   reshape per layer type in :data:`NOISE_ROW_FOLDS`). With K loss rows per example (rows ``i*K .. i*K+K-1`` are
   example ``i``, see ``multiplicity.py``), a layer whose per-sample gradient is a sum over every position between
   the batch and the feature dimension (``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``) gets its activations and
   backprops reshaped from ``[B*K, T, ...]`` to ``[B, K*T, ...]`` and its backprops divided by K: the sampler then
   returns the per-example mean over the K rows directly, ``[B, ...]`` instead of ``[B*K, ...]`` (4x less per-sample
   gradient memory and einsum output at K = 4, the same numbers up to float rounding). The multiplicity reduction in
   ``MultiplicityDPOptimizer`` keeps tensors that already have B rows, and still reduces the layers not folded
   (GroupNorm, Conv: their samplers need the channel at dim 1).

3. **Book-keeping** (``bookkeeping=True``, ``grad_sample_mode="bookkeeping"``;
   :meth:`DPGradSampleModule._bookkeeping_sampler` picks :func:`_bookkeep_linear` from
   :data:`BOOKKEEPING_SAMPLERS`): an ``nn.Linear`` weight with fewer positions per example than
   ``in * out / (in + out)`` gets its per-example squared (ghost) norms ``[B]`` as ``grad_sample`` and keeps its
   activations and backprops for the clipped sum (``bookkeeping.py``), instead of ``[B, out, in]`` per-sample
   gradients. Other layers (and a weight used more than once in a forward pass, or whose K noise rows were not
   folded) take the materialised path, which is then the cheaper and smaller one.

4. **No summed gradient from autograd** (:meth:`DPGradSampleModule._take_params_out_of_autograd` and
   :func:`_return_params_to_autograd`, added by ``_add_params_out_of_autograd_hooks``). Under DP, Opacus never reads
   the ``p.grad`` that autograd accumulates for a trained parameter (the optimizer builds ``p.grad`` from the
   clipped per-sample gradients and the noise), yet autograd computes it: one weight-gradient GEMM (or convolution)
   per trained layer, wasted. While a trained module runs its forward pass on an input that requires grad, its own
   parameters are switched to ``requires_grad=False`` and switched back right after (a forward hook that runs before
   Opacus' and even when the forward raises): autograd then records no parameter gradient, the module's output still
   requires grad through its input, and Opacus' hooks see the same activations and backprops. Modules whose inputs
   need no grad (the first trained layer, an embedding's indices) are left as they are.

Why by hand: Opacus exposes no hook for any of these (opacus 1.6.0). They are checked against stock Opacus and against
per-example gradients computed by a loop in ``tests/test_privacy_engine.py``, ``tests/test_bookkeeping.py`` and
``tests/test_families.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample, promote_current_grad_sample
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from .bookkeeping import BOOKKEEPING_INPUTS, linear_weight_ghost_norms2

#: Item 2, by layer type: ``fold(layer, activations, num_examples)`` -> the activations reshaped from ``[B*K, ...]``
#: to ``[B, K*...]``, or None where this layer must not be folded. Only for layers whose registered Opacus grad
#: sampler sums over every position between the batch and the last dimension, so that the K rows folded into the
#: positions are summed too. Looked up along the layer's MRO (subclasses included), unlike Opacus' exact-type tables.
NOISE_ROW_FOLDS: dict[type[nn.Module], Callable] = {}

#: Item 3, by exact layer type (as Opacus' ``GRAD_SAMPLERS``): ``sampler(layer, activations, backprops, scale)`` ->
#: ``{weight: per-example squared norms [B], other parameter: per-sample gradients}``, the weight's inputs kept
#: under ``BOOKKEEPING_INPUTS`` for the clipped sum. The layer must have a ``weight`` ``[out, in]``.
BOOKKEEPING_SAMPLERS: dict[type[nn.Module], Callable] = {}


def _register(table: dict, *layer_types: type[nn.Module]):
    """Decorator: the function serves ``layer_types`` in ``table`` (cf. Opacus' ``register_grad_sampler``)."""

    def decorator(f):
        for layer_type in layer_types:
            table[layer_type] = f
        return f

    return decorator


def _registered(table: dict, module: nn.Module):
    """The entry of ``table`` for the first class in ``module``'s MRO that has one (``isinstance`` semantics)."""
    return next((table[cls] for cls in type(module).__mro__ if cls in table), None)


# Item 2, per layer type.


@_register(NOISE_ROW_FOLDS, nn.Linear)
def _fold_features_last(_module: nn.Module, activations, b: int) -> list:
    """Features last: ``[B*K, ..., F]`` -> ``[B, K*..., F]``."""
    return [a.reshape(b, -1, a.shape[-1]) for a in activations]


@_register(NOISE_ROW_FOLDS, nn.LayerNorm)
def _fold_layer_norm(module: nn.LayerNorm, activations, b: int) -> list | None:
    """As a linear layer's, when normalised over the last dimension only (over several: keep them apart)."""
    return _fold_features_last(module, activations, b) if len(module.normalized_shape) == 1 else None


@_register(NOISE_ROW_FOLDS, nn.Embedding)
def _fold_embedding(_module: nn.Embedding, activations, b: int) -> list:
    """Indices ``[B*K, ...]``, no feature dimension: ``[B, K*...]``."""
    return [a.reshape(b, -1) for a in activations]


# Item 3, per layer type.


@_register(BOOKKEEPING_SAMPLERS, nn.Linear)
def _bookkeep_linear(module: nn.Linear, activations: torch.Tensor, backprops: torch.Tensor, scale: float) -> dict:
    """The per-example squared norms of the weight's gradients ``scale * g_i^T a_i`` (its inputs kept for the
    clipped sum) and the bias' per-sample gradients, as Opacus' linear sampler would give them (``[B, out]``: the
    sum over positions)."""
    a, g = _positions(activations), _positions(backprops)
    setattr(module.weight, BOOKKEEPING_INPUTS, (a, g, scale))
    grad_samples = {module.weight: linear_weight_ghost_norms2(a, g) * scale**2}
    if module.bias is not None and module.bias.requires_grad:
        grad_samples[module.bias] = g.sum(dim=1) * scale
    return grad_samples


def _positions(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., F]`` -> ``[B, T, F]`` (T = 1 for ``[B, F]``; also for an empty batch)."""
    return t.unsqueeze(1) if t.dim() == 2 else t.flatten(1, -2)


#: Trained layers whose per-sample gradients take the fold (item 2).
FOLDABLE_MODULES = tuple(NOISE_ROW_FOLDS)


class DPGradSampleModule(GradSampleModule):
    """``GradSampleModule`` (hooks mode) without the zero-fill copy and with noise multiplicity folded into the
    samplers of :data:`FOLDABLE_MODULES` (see the module docstring). ``noise_multiplicity`` is K; before each
    backward pass, :meth:`set_num_examples` says how many examples the physical batch holds. ``bookkeeping``:
    ``nn.Linear`` weights store per-example squared norms for a ``BookkeepingMixin`` optimizer (``bookkeeping.py``).
    """

    def __init__(self, m: nn.Module, *, noise_multiplicity: int = 1, bookkeeping: bool = False, **kwargs):
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        super().__init__(m, **kwargs)
        self.noise_multiplicity = noise_multiplicity
        self.bookkeeping = bookkeeping
        self._num_examples: int | None = None
        self._add_params_out_of_autograd_hooks()

    def set_num_examples(self, num_examples: int | None) -> None:
        """Examples (not rows) in the physical batch about to be back-propagated; enables the multiplicity fold."""
        self._num_examples = num_examples

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        """Opacus 1.6's ``GradSampleHooks.capture_backprops_hook`` with items 1-3 in place of its accumulation.
        Opacus' "mean" rescaling of the backprops (x rows) is applied once, together with the fold's 1/K, or (book-
        keeping) to the per-example results instead of to a copy of the backprops."""
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction="sum", batch_first=batch_first
        )
        scale = module.max_batch_len if loss_reduction == "mean" else 1
        activations, backprops, k = self._fold_noise_rows(module, activations, backprops)
        scale = scale / k
        rows = backprops.shape[0]  # module.max_batch_len, or B after a fold
        bookkeeping_sampler = self._bookkeeping_sampler(module, rows, backprops)
        if bookkeeping_sampler is not None:
            grad_samples = bookkeeping_sampler(module, activations[0], backprops, scale)
        else:
            if scale != 1:
                backprops = backprops * scale
            grad_samples = self._grad_sampler(module)(module, activations, backprops)
        inputs = [t for t in (*activations, backprops) if isinstance(t, torch.Tensor)]
        for param, gs in grad_samples.items():
            _store_without_copy(param, gs, rows, inputs)
        self._promote_when_done(module)

    def _grad_sampler(self, module: nn.Module) -> Callable:
        """Opacus' choice of materialised grad sampler: the registered one, or functorch."""
        module_type = self._get_module_type(module)
        if not self.force_functorch and module_type in self.GRAD_SAMPLERS:
            return self.GRAD_SAMPLERS[module_type]
        return ft_compute_per_sample_gradient

    def _promote_when_done(self, module: nn.Module) -> None:
        """Opacus' end of a backward call, unchanged: a parameter whose last pending call this was gets its
        ``grad_sample``; Poisson sampling refuses accumulated batches; the layer forgets its batch length."""
        for _, p in trainable_parameters(module):
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise ValueError(
                    "Poisson sampling is not compatible with grad accumulation. You need to call optimizer.step() "
                    "after every forward/backward pass or consider using BatchMemoryManager"
                )
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len

    # Item 2: the K fold.

    def _fold_noise_rows(self, module: nn.Module, activations, backprops: torch.Tensor):
        """``[B*K, ...]`` -> ``[B, K*...]`` for a layer with an entry in :data:`NOISE_ROW_FOLDS` that saw B*K rows, so
        that its sampler sums each example's K rows; returns the reshaped activations and backprops and the K
        folded (1: nothing folded). The caller divides the backprops by it."""
        k, b = self.noise_multiplicity, self._num_examples
        if k == 1 or not b or backprops.shape[0] != b * k:
            return activations, backprops, 1
        fold = _registered(NOISE_ROW_FOLDS, module)
        folded = None if fold is None else fold(module, activations, b)
        if folded is None:
            return activations, backprops, 1
        return folded, backprops.reshape(b, -1, backprops.shape[-1]), k

    # Item 3: book-keeping.

    def _bookkeeping_sampler(self, module: nn.Module, rows: int, backprops: torch.Tensor) -> Callable | None:
        """The :data:`BOOKKEEPING_SAMPLERS` entry for this backward call of ``module``, or None (materialised path).
        Book-keeping needs a trained weight used once in the forward pass (no other call pending, none stored) whose
        K noise rows were folded (K > 1), and it must pay: with T positions per example, the ghost norm costs
        ``T^2 (in + out)`` and the kept inputs ``T (in + out)`` floats per example, against ``T in out`` and
        ``in out`` for Opacus' per-sample gradient; it is used when ``T (in + out) < in out``, i.e. when it is both
        cheaper and smaller."""
        sampler = BOOKKEEPING_SAMPLERS.get(type(module))
        if not (self.bookkeeping and sampler is not None and module.weight.requires_grad):
            return None
        w = module.weight
        if w._forward_counter != 1 or hasattr(w, "_current_grad_sample") or hasattr(w, BOOKKEEPING_INPUTS):
            return None
        if self.noise_multiplicity > 1 and rows != self._num_examples:
            return None
        d_out, d_in = w.shape
        positions = math.prod(backprops.shape[1:-1])
        return sampler if positions * (d_in + d_out) < d_in * d_out else None

    # Item 4: parameters out of autograd.

    def _add_params_out_of_autograd_hooks(self) -> None:
        """On every module with trained parameters of its own: :meth:`_take_params_out_of_autograd` before its
        forward pass and :func:`_return_params_to_autograd` after it, before Opacus' forward hook and even when the
        forward raises."""
        for module in self.iterate_submodules(self._module):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self.autograd_grad_sample_hooks += [
                    module.register_forward_pre_hook(self._take_params_out_of_autograd),
                    module.register_forward_hook(_return_params_to_autograd, prepend=True, always_call=True),
                ]

    def _take_params_out_of_autograd(self, module: nn.Module, args) -> None:
        """Forward pre-hook: the module's trained parameters stop requiring grad while it runs on an input that
        does, so autograd computes no summed gradient nobody reads; its output still requires grad."""
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return  # the output would not require grad: no backward hook, no per-sample gradient
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not params:  # already out (a module re-entered inside its own forward): the outer call restores them
            return
        for p in params:
            p.requires_grad_(False)
        module._dp_params_out_of_graph = params


def _return_params_to_autograd(module: nn.Module, _args, _output) -> None:
    """Forward hook (runs first, and also when the forward raised): trained parameters require grad again."""
    for p in module.__dict__.pop("_dp_params_out_of_graph", ()):
        p.requires_grad_(True)


# Item 1: no zero-fill + copy.


def _store_without_copy(param: nn.Parameter, grad_sample: torch.Tensor, rows: int, inputs: list[torch.Tensor]):
    """Keep as ``_current_grad_sample`` a per-sample gradient tensor of ``rows`` rows that owns all of its storage
    (an einsum result is a view of a bmm result of exactly its size) and shares none with the layer's activations or
    backprops (``inputs``), instead of Opacus' zero-filled buffer and copy; anything else (a second gradient of a
    tied parameter, a view, a short batch) goes through Opacus' ``create_or_accumulate_grad_sample``."""
    if not param.requires_grad:
        return
    storage = grad_sample.untyped_storage()
    owned = (
        grad_sample.shape[0] == rows
        and grad_sample.is_contiguous()
        and grad_sample.storage_offset() == 0
        and storage.nbytes() == grad_sample.numel() * grad_sample.element_size()
        and all(storage.data_ptr() != t.untyped_storage().data_ptr() for t in inputs)
    )
    if owned and not hasattr(param, "_current_grad_sample"):
        param._current_grad_sample = grad_sample
    else:
        create_or_accumulate_grad_sample(param=param, grad_sample=grad_sample, max_batch_len=rows)
