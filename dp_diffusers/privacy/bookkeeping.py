"""Book-keeping clipping for ``nn.Linear`` weights: exact per-example clipping without ``[B, out, in]`` tensors.

Opacus' hooks mode writes every trained weight's per-sample gradients (``B x trained parameters`` floats per
physical batch), reads them once for the per-example norms and once more for the clipped sum. For a linear layer
with activations ``a`` ``[B, T, in]`` and backprops ``g`` ``[B, T, out]``, example i's weight gradient is
``G_i = g_i^T a_i``, and both things DP-SGD needs come without storing any ``G_i``:

* its squared norm, ``||G_i||^2``: either ``sum((g_i^T a_i)^2)`` (one layer's per-sample gradients, computed and
  dropped at once) or, when cheaper, the "ghost norm" ``sum((a_i a_i^T) * (g_i g_i^T))`` (``T x T`` Gram matrices;
  Li et al. 2022), whichever costs fewer multiply-adds (``T*in*out`` vs ``T^2*(in+out)``);
* the clipped sum, ``sum_i c_i G_i = (c * g)^T a``: one GEMM over all ``B*T`` positions, the cost of the weight
  gradient itself (book-keeping, Bu et al. 2023), from the activations and backprops the hooks hold anyway.

The hooks (``DPGradSampleModule(bookkeeping=True)``, ``grad_sample.py``) therefore store a weight's per-example
*squared norms* ``[B]`` as its ``grad_sample`` and keep ``(a, g)`` beside it; :class:`BookkeepingMixin` adds them to
the other parameters' norms, clips, and forms the clipped sum with one GEMM. Biases, norms' affine parameters and
embeddings keep Opacus' materialised per-sample gradients (they are small). Everything after the clipped sum (noise,
scaling, the distributed reduction, the accountant) is Opacus' ``DPOptimizer`` unchanged.

Why by hand: Opacus 1.6 has ghost clipping only as a second backward pass over the whole model (``grad_sample_mode
="ghost"``, which costs about 1.3-1.5x hooks mode here) and no book-keeping. ``tests/test_privacy_engine.py`` checks
this mode's step against stock Opacus and its per-example gradients against a loop.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

#: Attribute of a weight that holds ``(activations [B, T, in], backprops [B, T, out], scale)`` until the optimizer
#: clips; the weight's per-example gradients are ``scale * backprops_i^T activations_i``.
BOOKKEEPING_INPUTS = "_bookkeeping_inputs"


def linear_weight_norms2(activations: torch.Tensor, backprops: torch.Tensor) -> torch.Tensor:
    """Per-example squared Frobenius norms ``[B]`` of a linear layer's weight gradients ``g_i^T a_i``.

    ``activations``: ``[B, T, in]``, ``backprops``: ``[B, T, out]`` (T positions per example, summed over).
    """
    t, d_in, d_out = activations.shape[1], activations.shape[2], backprops.shape[2]
    if t * (d_in + d_out) < d_in * d_out:  # ghost norm: two [B, T, T] Gram matrices
        aa = torch.bmm(activations, activations.transpose(1, 2))
        gg = torch.bmm(backprops, backprops.transpose(1, 2))
        return (aa * gg).sum(dim=(1, 2))
    return torch.bmm(backprops.transpose(1, 2), activations).square().sum(dim=(1, 2))


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
    book-keeping weights' squared norms added to the others' and their clipped sums formed by one GEMM."""

    def clip_and_accumulate(self):
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:  # empty Poisson batch
            clip_factors = torch.zeros((0,), device=grad_samples[0].device)
        else:
            squares = [
                g.to(torch.float32) if has_bookkeeping(p) else g.reshape(len(g), -1).to(torch.float32).square().sum(1)
                for p, g in zip(self.params, grad_samples, strict=True)
            ]
            device = squares[0].device
            norms = torch.stack([s.to(device) for s in squares], dim=1).sum(dim=1).sqrt()
            clip_factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, grad_sample in zip(self.params, grad_samples, strict=True):
            _check_processed_flag(p.grad_sample)
            factors = clip_factors.to(device=grad_sample.device, dtype=p.dtype)
            if has_bookkeeping(p):
                activations, backprops, scale = getattr(p, BOOKKEEPING_INPUTS)
                grad = linear_weight_clipped_sum(activations.to(p.dtype), backprops.to(p.dtype), factors * scale)
                clear_bookkeeping(p)
            else:
                grad = torch.einsum("i,i...", factors, grad_sample.to(p.dtype))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def zero_grad(self, set_to_none: bool = False):
        for p in self.params:
            clear_bookkeeping(p)
        super().zero_grad(set_to_none)
