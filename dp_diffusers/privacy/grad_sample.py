"""Opacus' hooks-based per-sample gradients, with exact shortcuts that Opacus 1.6 does not take.

``DPGradSampleModule`` is Opacus' ``GradSampleModule`` (same hooks, same registered grad samplers, same
``grad_sample`` contract for ``DPOptimizer``) with its backward hook rewritten for the cases below and a forward
pre-hook added (item 4); the code path is otherwise Opacus' own, line for line:

1. **No zero-fill + copy.** Opacus' ``create_or_accumulate_grad_sample`` allocates a zero ``[max_batch_len, ...]``
   buffer and copies each layer's per-sample gradients into it, even when they arrive in one piece of exactly
   ``max_batch_len`` rows, which is every layer here (no RNNs, no packed sequences). That doubles the memory
   traffic of the per-sample gradients (``B x trained parameters`` floats per physical batch), which is the DP
   overhead on CPU. When the first gradient of a parameter in a backward pass is a fresh, contiguous tensor of
   ``max_batch_len`` rows that owns its storage, it is kept as is; every other case (tied parameters, tensors that
   share memory with the layer's inputs, short batches) takes Opacus' path.
2. **Noise multiplicity folded into the grad sampler.** With K loss rows per example (rows ``i*K .. i*K+K-1`` are
   example ``i``, see ``multiplicity.py``), a layer whose per-sample gradient is a sum over every position between
   the batch and the feature dimension (``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``) gets its activations and
   backprops reshaped from ``[B*K, T, ...]`` to ``[B, K*T, ...]`` and its backprops divided by K: the sampler then
   returns the per-example mean over the K rows directly, ``[B, ...]`` instead of ``[B*K, ...]`` (4x less
   per-sample gradient memory and einsum output at K = 4, the same numbers up to float rounding). The
   multiplicity reduction in ``MultiplicityDPOptimizer`` keeps tensors that already have B rows, and still reduces
   the layers not folded (GroupNorm, Conv: their samplers need the channel at dim 1).

3. **Book-keeping** (``bookkeeping=True``, ``grad_sample_mode="bookkeeping"``): an ``nn.Linear`` weight with fewer
   positions per example than ``in * out / (in + out)`` gets its per-example squared (ghost) norms ``[B]`` as
   ``grad_sample`` and keeps its activations and backprops for the clipped sum (``bookkeeping.py``), instead of
   ``[B, out, in]`` per-sample gradients. Other layers (and a weight used more than once in a forward pass, or whose
   K noise rows were not folded) take the materialised path, which is then the cheaper and smaller one.

4. **No summed gradient from autograd.** Under DP, Opacus never reads the ``p.grad`` that autograd accumulates for a
   trained parameter (the optimizer builds ``p.grad`` from the clipped per-sample gradients and the noise), yet
   autograd computes it: one weight-gradient GEMM (or convolution) per trained layer, wasted. While a trained
   module runs its forward pass on an input that requires grad, its own parameters are switched to
   ``requires_grad=False`` and switched back right after (a forward hook that runs before Opacus' and even when the
   forward raises): autograd then records no parameter gradient, the module's output still requires grad through
   its input, and Opacus' hooks see the same activations and backprops. Modules whose inputs need no grad (the
   first trained layer, an embedding's indices) are left as they are.

Why by hand: Opacus exposes no hook for any of these (opacus 1.6.0). They are checked against stock Opacus and against
per-example gradients computed by a loop in ``tests/test_privacy_engine.py``, ``tests/test_bookkeeping.py`` and
``tests/test_families.py``.
"""

from __future__ import annotations

import math

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample, promote_current_grad_sample
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from .bookkeeping import BOOKKEEPING_INPUTS, linear_weight_ghost_norms2

#: Modules whose registered Opacus grad sampler sums over all positions between the batch and the last dimension,
#: so that folding K rows per example into the position dimension yields the per-example sum over the K rows.
FOLDABLE_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding)


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
        for module in self.iterate_submodules(self._module):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self.autograd_grad_sample_hooks += [
                    module.register_forward_pre_hook(self._params_out_of_graph),
                    module.register_forward_hook(_params_back, prepend=True, always_call=True),
                ]

    def _params_out_of_graph(self, module: nn.Module, args) -> None:
        """Forward pre-hook: keep the module's trained parameters out of the autograd graph (item 4 above)."""
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

    def set_num_examples(self, num_examples: int | None) -> None:
        """Examples (not rows) in the physical batch about to be back-propagated; enables the multiplicity fold."""
        self._num_examples = num_examples

    def _fold(self, module: nn.Module, activations, backprops: torch.Tensor):
        """``[B*K, ...]`` -> ``[B, K*...]`` for a foldable module that saw B*K rows; returns the reshaped
        activations and backprops and the K folded (1: nothing folded). The caller divides the backprops by it."""
        k, b = self.noise_multiplicity, self._num_examples
        if k == 1 or not b or not isinstance(module, FOLDABLE_MODULES) or backprops.shape[0] != b * k:
            return activations, backprops, 1
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return activations, backprops, 1  # normalised over several trailing dimensions: keep them
        if isinstance(module, nn.Embedding):  # indices [B*K, ...], no feature dimension: [B, K*...]
            fold = [a.reshape(b, -1) for a in activations]
        else:  # features last: [B*K, ..., F] -> [B, K*..., F]
            fold = [a.reshape(b, -1, a.shape[-1]) for a in activations]
        return fold, backprops.reshape(b, -1, backprops.shape[-1]), k

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        # Opacus 1.6's GradSampleHooks.capture_backprops_hook, with _fold and _store in place of its accumulation,
        # and Opacus' "mean" rescaling of the backprops (x rows) applied once, together with the fold's 1/K, or
        # (book-keeping) to the per-example results instead of to a copy of the backprops.
        if not self.hooks_enabled:
            return
        backprops = forward_output[0].detach()
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=backprops, loss_reduction="sum", batch_first=batch_first
        )
        scale = module.max_batch_len if loss_reduction == "mean" else 1
        activations, backprops, k = self._fold(module, activations, backprops)
        scale = scale / k
        rows = backprops.shape[0]  # module.max_batch_len, or B after a fold
        if self._bookkeeping_applies(module, rows, backprops):
            grad_samples = _bookkeeping_linear(module, activations[0], backprops, scale)
        else:
            if scale != 1:
                backprops = backprops * scale
            module_type = self._get_module_type(module)
            if not self.force_functorch and module_type in self.GRAD_SAMPLERS:
                grad_sampler_fn = self.GRAD_SAMPLERS[module_type]
            else:
                grad_sampler_fn = ft_compute_per_sample_gradient
            grad_samples = grad_sampler_fn(module, activations, backprops)
        inputs = [t for t in (*activations, backprops) if isinstance(t, torch.Tensor)]
        for param, gs in grad_samples.items():
            _store(param, gs, rows, inputs)
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

    def _bookkeeping_applies(self, module: nn.Module, rows: int, backprops: torch.Tensor) -> bool:
        """Book-keeping for this backward call of ``module``: an ``nn.Linear`` with a trained weight that is used
        once in the forward pass (no other call pending, none stored), whose K noise rows were folded (K > 1), and
        where it pays: with T positions per example, the ghost norm costs ``T^2 (in + out)`` and the kept inputs
        ``T (in + out)`` floats per example, against ``T in out`` and ``in out`` for Opacus' per-sample gradient; book-
        keeping is used when ``T (in + out) < in out``, i.e. when it is both cheaper and smaller."""
        if not (self.bookkeeping and type(module) is nn.Linear and module.weight.requires_grad):
            return False
        w = module.weight
        if w._forward_counter != 1 or hasattr(w, "_current_grad_sample") or hasattr(w, BOOKKEEPING_INPUTS):
            return False
        if self.noise_multiplicity > 1 and rows != self._num_examples:
            return False
        positions = math.prod(backprops.shape[1:-1])
        return positions * (module.in_features + module.out_features) < module.in_features * module.out_features


def _params_back(module: nn.Module, _args, _output) -> None:
    """Forward hook (runs first, and also when the forward raised): trained parameters require grad again."""
    for p in module.__dict__.pop("_dp_params_out_of_graph", ()):
        p.requires_grad_(True)


def _bookkeeping_linear(module: nn.Linear, activations: torch.Tensor, backprops: torch.Tensor, scale: float) -> dict:
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


def _store(param: nn.Parameter, grad_sample: torch.Tensor, rows: int, inputs: list[torch.Tensor]) -> None:
    """Keep a per-sample gradient tensor that owns all of its storage (an einsum result is a view of a bmm result
    of exactly its size) and shares none with the layer's activations or backprops; anything else goes through
    Opacus' zero-fill path."""
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
