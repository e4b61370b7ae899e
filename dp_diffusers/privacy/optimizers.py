"""The Opacus ``DPOptimizer`` classes the engine uses: Opacus' own, with ``scale_grad`` linear in the tensor count,
clipping in float32 with book-keeping weights (``bookkeeping.py``), and noise multiplicity (``multiplicity.py``) as
mixins. Two questions pick the class: distributed or not, K > 1 or not.

Opacus 1.6's ``DPOptimizer.scale_grad`` divides each parameter's gradient by
``expected_batch_size * self.accumulated_iterations``, and ``accumulated_iterations`` is a property that walks every
parameter, so one step costs O(tensors^2) Python work (183 trained tensors here: ~5 ms a step on CPU, 14 ms for a
full UNet). :class:`ScaleGradOnceMixin` evaluates it once per step; the result is the same division.
"""

from __future__ import annotations

from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

from .bookkeeping import BookkeepingMixin
from .multiplicity import NoiseMultiplicityMixin


class ScaleGradOnceMixin:
    """``scale_grad`` with ``accumulated_iterations`` evaluated once, not once per parameter."""

    def scale_grad(self):
        if self.loss_reduction == "mean":
            scale = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= scale


class EngineDPOptimizer(ScaleGradOnceMixin, BookkeepingMixin, DPOptimizer):
    """Opacus ``DPOptimizer`` (flat clipping, noise, loss scaling) with :class:`ScaleGradOnceMixin` and
    ``BookkeepingMixin``'s ``clip_and_accumulate``: per-example norms, clip factors and the clipped sum in float32
    (under bf16 autocast too; Opacus computes the norms in the per-sample gradients' dtype, and bf16 norms let a
    clipped contribution exceed C), plus book-keeping weights where the hooks stored them (none in hooks mode)."""


class EngineDistributedDPOptimizer(ScaleGradOnceMixin, BookkeepingMixin, DistributedDPOptimizer):
    """Opacus ``DistributedDPOptimizer`` (noise added on rank 0 only), otherwise as :class:`EngineDPOptimizer`."""


class MultiplicityDPOptimizer(NoiseMultiplicityMixin, EngineDPOptimizer):
    """:class:`EngineDPOptimizer` with noise multiplicity: K rows reduced first, then clipped (``multiplicity.py``)."""


class DistributedMultiplicityDPOptimizer(NoiseMultiplicityMixin, EngineDistributedDPOptimizer):
    """:class:`EngineDistributedDPOptimizer` with noise multiplicity."""


def engine_optimizer_class(*, distributed: bool, noise_multiplicity: int):
    """``(class, extra kwargs)`` of the engine's ``DPOptimizer`` for these settings."""
    if noise_multiplicity > 1:
        cls = DistributedMultiplicityDPOptimizer if distributed else MultiplicityDPOptimizer
        return cls, {"noise_multiplicity": noise_multiplicity}
    return (EngineDistributedDPOptimizer if distributed else EngineDPOptimizer), {}
