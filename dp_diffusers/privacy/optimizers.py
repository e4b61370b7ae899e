"""The Opacus ``DPOptimizer`` classes the engine uses: Opacus' own, with ``scale_grad`` linear in the tensor count,
plus noise multiplicity (``multiplicity.py``) and book-keeping clipping (``bookkeeping.py``) as mixins.

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


class EngineDPOptimizer(ScaleGradOnceMixin, DPOptimizer):
    """Opacus ``DPOptimizer`` (flat clipping, noise, loss scaling) with :class:`ScaleGradOnceMixin`."""


class EngineDistributedDPOptimizer(ScaleGradOnceMixin, DistributedDPOptimizer):
    """Opacus ``DistributedDPOptimizer`` (noise added on rank 0 only) with :class:`ScaleGradOnceMixin`."""


class MultiplicityDPOptimizer(NoiseMultiplicityMixin, EngineDPOptimizer):
    """Opacus ``DPOptimizer`` with noise multiplicity (see ``multiplicity.py``)."""


class DistributedMultiplicityDPOptimizer(NoiseMultiplicityMixin, EngineDistributedDPOptimizer):
    """Opacus ``DistributedDPOptimizer`` (noise added on rank 0 only) with noise multiplicity."""


class BookkeepingDPOptimizer(BookkeepingMixin, EngineDPOptimizer):
    """Opacus ``DPOptimizer`` with book-keeping clipping of ``nn.Linear`` weights (see ``bookkeeping.py``)."""


class DistributedBookkeepingDPOptimizer(BookkeepingMixin, EngineDistributedDPOptimizer):
    """Opacus ``DistributedDPOptimizer`` with book-keeping clipping."""


class BookkeepingMultiplicityDPOptimizer(NoiseMultiplicityMixin, BookkeepingMixin, EngineDPOptimizer):
    """Book-keeping clipping and noise multiplicity: K rows reduced first, then clipped."""


class DistributedBookkeepingMultiplicityDPOptimizer(
    NoiseMultiplicityMixin, BookkeepingMixin, EngineDistributedDPOptimizer
):
    """Distributed, book-keeping clipping and noise multiplicity."""


_CLASSES = {
    # (distributed, noise multiplicity > 1, book-keeping) -> class
    (False, False, False): EngineDPOptimizer,
    (True, False, False): EngineDistributedDPOptimizer,
    (False, True, False): MultiplicityDPOptimizer,
    (True, True, False): DistributedMultiplicityDPOptimizer,
    (False, False, True): BookkeepingDPOptimizer,
    (True, False, True): DistributedBookkeepingDPOptimizer,
    (False, True, True): BookkeepingMultiplicityDPOptimizer,
    (True, True, True): DistributedBookkeepingMultiplicityDPOptimizer,
}


def engine_optimizer_class(*, distributed: bool, noise_multiplicity: int, bookkeeping: bool):
    """``(class, extra kwargs)`` of the engine's ``DPOptimizer`` for these settings."""
    cls = _CLASSES[(distributed, noise_multiplicity > 1, bookkeeping)]
    return cls, ({"noise_multiplicity": noise_multiplicity} if noise_multiplicity > 1 else {})
