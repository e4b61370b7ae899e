"""Noise multiplicity (DPDM): K loss rows per example, one clipped gradient per example.

The caller repeats each example K times in its physical batch, example-major (rows ``i*K .. i*K+K-1`` are example
``i``, each with its own noise draw), and returns one loss per row. Stock Opacus would treat the K rows as K
examples (opacus issue #461, closed as won't fix): each would be clipped separately, so one example could move the
sum by K*C while the noise is calibrated for C. DPDM shipped a fork; here the fix is a reduction inside a
``DPOptimizer`` subclass, so Opacus stays unmodified.

Where: ``DPOptimizer.clip_and_accumulate`` is the one place that reads ``p.grad_sample`` (through
``_get_flat_grad_sample``) to compute per-sample norms and clipped sums. The mixin below replaces each
``p.grad_sample`` by its per-example mean over the K rows *before* delegating to it, so the norms, the clipping, the
``_processed`` bookkeeping and the distributed reduction are all Opacus' own (in book-keeping mode the norms and the
clipping are ``BookkeepingMixin``'s, ``bookkeeping.py``, which the mixin below also precedes).

Scaling: with ``loss_reduction="mean"`` GradSampleModule multiplies backprops by the number of rows it saw (B*K), so
row r of ``p.grad_sample`` is exactly the gradient of row r's loss ``l_r``. The mean over an example's K rows is
therefore the gradient of its mean-over-K loss, ``(1/K) sum_k l_ik``; Opacus then divides the clipped, noised sum by
``expected_batch_size``, which counts examples. A trained layer that runs on per-example inputs (B rows, e.g. a class
embedding computed once and repeated K times afterwards) sees backprops scaled by B instead, which again yields the
gradient of the example's mean-over-K loss: such a ``grad_sample`` already has one row per example and is kept. So
is one that ``DPGradSampleModule`` (``grad_sample.py``) already reduced inside the grad sampler (``nn.Linear``,
``nn.LayerNorm``, ``nn.Embedding``), and a book-keeping weight's per-example squared norms ``[B]``: the reduction
here then only touches the other layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def reduce_rows(grad_sample: torch.Tensor, *, multiplicity: int, num_examples: int | None = None) -> torch.Tensor:
    """Per-example gradients from per-row ones: mean over each example's ``multiplicity`` consecutive rows.

    A tensor that already has ``num_examples`` rows is returned as is (see the module docstring).
    """
    rows = grad_sample.shape[0]
    if num_examples is not None:
        if rows == num_examples:
            return grad_sample
        if rows != num_examples * multiplicity:
            raise ValueError(
                f"A per-sample gradient has {rows} rows; expected {num_examples} examples x {multiplicity} noise "
                f"draws = {num_examples * multiplicity} (or {num_examples}). Every trained layer must see the rows "
                f"example-major: example i at rows i*K .. i*K+K-1."
            )
    elif rows % multiplicity:
        raise ValueError(
            f"A per-sample gradient has {rows} rows, not a multiple of noise_multiplicity={multiplicity}."
        )
    return grad_sample.reshape(rows // multiplicity, multiplicity, *grad_sample.shape[1:]).mean(dim=1)


def repeat_rows(batch, multiplicity: int):
    """Repeat every tensor in ``batch`` (nested dicts, lists, tuples) ``multiplicity`` times along dim 0,
    example-major: the layout :class:`NoiseMultiplicityMixin` expects. Non-tensors are returned unchanged."""
    if multiplicity == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.repeat_interleave(multiplicity, dim=0)
    if isinstance(batch, Mapping):
        return type(batch)({k: repeat_rows(v, multiplicity) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(repeat_rows(v, multiplicity) for v in batch)
    return batch


class NoiseMultiplicityMixin:
    """Mixin for an Opacus ``DPOptimizer`` class: reduce K rows per example to one before clipping."""

    def __init__(self, *args, noise_multiplicity: int, **kwargs):
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        super().__init__(*args, **kwargs)
        self.noise_multiplicity = noise_multiplicity
        self._num_examples: int | None = None

    def set_num_examples(self, num_examples: int | None) -> None:
        """Examples in the physical batch just back-propagated (rows / K); lets the reduction check row counts."""
        self._num_examples = num_examples

    def _reduce(self, grad_sample):
        if isinstance(grad_sample, list):
            return [self._reduce(g) for g in grad_sample]
        if grad_sample is None or hasattr(grad_sample, "_processed"):
            # Leave used or missing tensors alone so Opacus' own checks still fire on them.
            return grad_sample
        return reduce_rows(grad_sample, multiplicity=self.noise_multiplicity, num_examples=self._num_examples)

    def clip_and_accumulate(self):
        for p in self.params:
            p.grad_sample = self._reduce(getattr(p, "grad_sample", None))
        self._num_examples = None
        super().clip_and_accumulate()
