"""Book-keeping clipping for ``nn.Linear`` weights: exact per-example clipping without ``[B, out, in]`` tensors.

Opacus' hooks mode writes every trained weight's per-sample gradients (``B x trained parameters`` floats per
physical batch), reads them once for the per-example norms and once more for the clipped sum. For a linear layer
with activations ``a`` ``[B, T, in]`` and backprops ``g`` ``[B, T, out]``, example i's weight gradient is
``G_i = g_i^T a_i``, and both things DP-SGD needs come without storing any ``G_i``:

* its squared norm, ``||G_i||^2 = sum((a_i a_i^T) * (g_i g_i^T))``: the "ghost norm" (Li et al. 2022), from two
  ``T x T`` Gram matrices, ``T^2 (in + out)`` multiply-adds instead of the ``T in out`` of ``G_i`` itself;
* the clipped sum, ``sum_i c_i G_i = (c * g)^T a``: one GEMM over all ``B*T`` positions, the cost of the weight
  gradient itself (book-keeping, Bu et al. 2023), from the activations and backprops the hooks hold anyway.

The hooks (``DPGradSampleModule(bookkeeping=True)``, ``grad_sample.py``) use this where it pays, for a weight with
``T (in + out) < in out`` (then the ghost norm is cheaper than ``G_i``, and the kept ``a_i``, ``g_i`` are smaller than
``G_i``; e.g. cross-attention keys and values on a few class tokens, feed-forward layers on coarse feature maps):
they store its per-example *squared norms* ``[B]`` as its ``grad_sample`` and keep ``(a, g)`` beside it;
:class:`BookkeepingMixin` adds them to the other parameters' norms, clips, and forms the clipped sum with one GEMM.
Every other parameter keeps Opacus' materialised per-sample gradients, which are then the cheaper and smaller choice
(Bu et al. call the per-layer choice "mixed ghost norm"). Everything after the clipped sum (noise, scaling, the
distributed reduction, the accountant) is Opacus' ``DPOptimizer`` unchanged.

Why by hand: Opacus 1.6 has ghost clipping only as a second backward pass over the whole model (``grad_sample_mode
="ghost"``, which costs about 1.5x hooks mode here) and no book-keeping. ``tests/test_bookkeeping.py`` checks this
mode's step against stock Opacus and hooks mode; ``tests/test_families.py`` checks each model family's clipped step
against per-example gradients computed by a loop.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

#: Attribute of a weight that holds ``(activations [B, T, in], backprops [B, T, out], scale)`` until the optimizer
#: clips; the weight's per-example gradients are ``scale * backprops_i^T activations_i``.
BOOKKEEPING_INPUTS = "_bookkeeping_inputs"


def linear_weight_ghost_norms2(activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-example squared Frobenius norms ``[B]`` of a linear layer's weight gradients ``g_i^T a_i``, from the
    ``[B, T, T]`` Gram matrices of ``activations`` ``[B, T, in]`` and ``backprops`` ``[B, T, out]``. In float32
    whatever their dtype: bf16 Gram matrices let a clipped contribution exceed C by ~5e-4 relative. Not Opacus'
    ``compute_linear_norm_sample`` on float32 inputs: its squared square roots never matched these bit for bit
    (measured: up to 2.5e-6 relative apart, 2.5e-6 from float64 against 1e-8 here, at T = 77, 320 -> 640), and it also
    forms a bias norm that the clipping does not use."""
    activations, backprops = activations.float(), backprops.float()
    aa = torch.bmm(activations, activations.transpose(1, 2))
    gg = torch.bmm(backprops, backprops.transpose(1, 2))
    return (aa * gg).sum(dim=(1, 2))


def linear_weight_clipped_sum(
    activations: torch.Tensor, backprops: torch.Tensor, clip_factors: torch.Tensor
) -> torch.Tensor:
    """``sum_i clip_factors[i] * g_i^T a_i`` as one ``[out, in]`` GEMM over all positions."""
    d_in, d_out = activations.shape[-1], backprops.shape[-1]
    c = clip_factors.view(-1, 1, 1)
    if d_in < d_out:  # weight the narrower operand (a copy of it)
        activations = activations * c
    else:
        backprops = backprops * c
    return backprops.reshape(-1, d_out).t().mm(activations.reshape(-1, d_in))


def has_bookkeeping(p: torch.Tensor) -> bool:
    return getattr(p, BOOKKEEPING_INPUTS, None) is not None


def clear_bookkeeping(p: torch.Tensor) -> None:
    if hasattr(p, BOOKKEEPING_INPUTS):
        delattr(p, BOOKKEEPING_INPUTS)


class BookkeepingMixin:
    """``clip_and_accumulate`` for an Opacus ``DPOptimizer`` whose hooks may store book-keeping weights (see the
    module docstring): the same flat clipping as Opacus (factor ``C / (norm + 1e-6)`` capped at 1), with the
    book-keeping weights' squared norms added to the others' and their clipped sums formed by one GEMM. Norms, clip
    factors and clipped sums are computed in float32 whatever the per-sample gradients' dtype (Opacus uses theirs:
    under bf16 autocast its clipped contributions reach 1.0008 C)."""

    def clip_and_accumulate(self):
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:  # empty Poisson batch
            clip_factors = torch.zeros((0,), device=grad_samples[0].device)
        else:
            squares = [
                g.to(torch.float32)
                if has_bookkeeping(p)
                else torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1, dtype=torch.float32).square()
                for p, g in zip(self.params, grad_samples, strict=True)
            ]
            device = squares[0].device
            norms = torch.stack([s.to(device) for s in squares], dim=1).sum(dim=1).sqrt()
            clip_factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, grad_sample in zip(self.params, grad_samples, strict=True):
            _check_processed_flag(p.grad_sample)
            # Clip factors and clipped sums in float32 (bf16 autocast included), then the parameter's dtype.
            factors = clip_factors.to(device=grad_sample.device, dtype=torch.float32)
            if has_bookkeeping(p):
                activations, backprops, scale = getattr(p, BOOKKEEPING_INPUTS)
                grad = linear_weight_clipped_sum(activations.float(), backprops.float(), factors * scale)
                clear_bookkeeping(p)
            else:
                grad = torch.einsum("i,i...", factors, grad_sample.float())
            grad = grad.to(p.dtype)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def zero_grad(self, set_to_none: bool = False):
        for p in self.params:
            clear_bookkeeping(p)
        super().zero_grad(set_to_none)
