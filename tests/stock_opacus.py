"""Reference for the engine's exactness tests: stock Opacus (GradSampleModule + DPOptimizer), no shortcuts."""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from dp_diffusers.privacy import reduce_rows


def stock_opacus_backward(model, x, y, t, *, multiplicity: int, noise_seed: int, **dp_kwargs) -> DPOptimizer:
    """Back-propagate the per-row squared error of ``model(x, y)`` against ``t`` through stock Opacus and reduce
    each example's K consecutive rows of per-sample gradients to their mean by hand; returns the ``DPOptimizer``
    (SGD, lr 0.1) ready to ``step()``."""
    stock = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.1), generator=torch.Generator().manual_seed(noise_seed), **dp_kwargs
    )
    ((stock(x, y) - t) ** 2).mean(dim=1).mean().backward()
    for p in params:
        p.grad_sample = reduce_rows(p.grad_sample, multiplicity=multiplicity)
    return optimizer
