"""Every place the engine reaches into Opacus' private state, and the Opacus versions that state was read from.

The engine drives Opacus' ``DPOptimizer`` and ``GradSampleModule`` through their public API where one exists. Three
jobs have none: (1) learning whether the optimizer's last ``step()`` was the one that closed a logical batch (the
optimizer only records it in a private flag); (2) forgetting a logical batch left half accumulated (when a loop
leaves :meth:`DPEngine.physical_batches` early, its partial clipped sum, per-sample gradients and the hooks'
activation bookkeeping must not leak into the next logical step, and ``zero_grad`` keeps the clipped sum while a step
is being skipped); (3) what a backward pass over zero examples leaves for the optimizer. Each function below names
the fields it touches and why no public API serves. (The Opacus subclasses, ``grad_sample.py``, ``bookkeeping.py``
and ``multiplicity.py``, extend Opacus' hooks and optimizer from the inside by design; they are not listed here.)

These fields are Opacus' implementation, not its interface: they were read from Opacus 1.6 and may change in any
minor release, and so may what the subclasses above rely on. Hence the pin ``opacus>=1.6,<1.7`` in
``pyproject.toml`` and the check at import time below, which refuses an untested Opacus
(``tests/test_opacus_version.py`` keeps the two in agreement). Set ``DP_DIFFUSERS_ALLOW_UNTESTED_OPACUS=1`` to turn
the refusal into a warning, at your own risk: run the test suite (``tests/test_privacy_engine.py`` compares every
step with stock Opacus) before trusting a run.
"""

from __future__ import annotations

import os
import re
import warnings

import opacus
import torch
from torch import nn

# Nothing of this package is imported here: ``dp_diffusers.privacy`` imports this module first, so that an untested
# Opacus is refused below before any other module imports Opacus' private functions (``bookkeeping.py``,
# ``grad_sample.py``).

#: The Opacus releases this package was tested with, as ``pyproject.toml`` requires them: one minor version.
TESTED_OPACUS = ">=1.6,<1.7"
TESTED_OPACUS_MINOR = (1, 6)
#: Environment variable that downgrades the refusal of an untested Opacus to a warning.
ALLOW_UNTESTED_ENV = "DP_DIFFUSERS_ALLOW_UNTESTED_OPACUS"


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_opacus_version(version: str | None = None) -> None:
    """Raise ImportError when ``version`` (default: the installed Opacus) is outside :data:`TESTED_OPACUS`, unless
    ``DP_DIFFUSERS_ALLOW_UNTESTED_OPACUS=1`` is set (then warn)."""
    version = opacus.__version__ if version is None else version
    if _minor(version) == TESTED_OPACUS_MINOR:
        return
    message = (
        f"dp-diffusers was tested with opacus{TESTED_OPACUS} and reaches into its private fields "
        f"(dp_diffusers/privacy/opacus_internals.py), but opacus {version} is installed: install "
        f"'opacus{TESTED_OPACUS}', or set {ALLOW_UNTESTED_ENV}=1 to run anyway and check the results."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, stacklevel=2)
        return
    raise ImportError(message)


check_opacus_version()


def last_step_skipped(optimizer) -> bool:
    """True when the DPOptimizer's last ``step()`` only accumulated (not the last physical batch of its logical one).

    Field: ``DPOptimizer._is_last_step_skipped``. No public API: ``step()`` returns None both when it skipped and when
    the wrapped optimizer's own ``step()`` returns None (the usual case), and ``_check_skip_next_step`` pops the queue.
    """
    return optimizer._is_last_step_skipped


def clear_skip_signals(optimizer) -> None:
    """Drop the "skip the next step" flags ``BatchSplittingSampler`` queued on the DPOptimizer for batches that were
    never stepped.

    Field: ``DPOptimizer._step_skip_queue``. No public API: ``signal_skip_step`` only appends to it.
    """
    optimizer._step_skip_queue.clear()


def discard_accumulated(optimizer, module: nn.Module, *, param_attrs: tuple[str, ...] = ()) -> None:
    """Forget a partially accumulated logical batch on the DPOptimizer ``optimizer`` and the hooks of ``module`` (the
    bare model, whose sub-modules and parameters Opacus' hooks annotate); ``param_attrs``: this package's own
    per-parameter attributes to delete too. Best effort; the caller then calls ``optimizer.zero_grad``.

    Fields and why no public API serves:

    * ``DPOptimizer._step_skip_queue``: queued skip flags (see :func:`clear_skip_signals`);
    * ``DPOptimizer._is_last_step_skipped``: while True, ``zero_grad`` keeps ``summed_grad``, the partial clipped sum;
    * ``p.summed_grad`` and ``p.grad_sample``: public attributes, but only ``zero_grad`` resets them, and it keeps
      ``summed_grad`` mid logical batch (above);
    * ``p._current_grad_sample`` (Opacus' per-sample gradient of a backward pass still under way): deleted, as
      ``GradSampleModule.cleanup`` would, but that also removes the hooks (so are ``param_attrs``, e.g.
      ``bookkeeping.BOOKKEEPING_INPUTS``, a linear weight's inputs kept for clipping);
    * ``p._forward_counter``: forward passes awaiting their backward; only ``GradSampleModule.add_hooks`` resets it;
    * ``m.activations`` and ``m.max_batch_len``: the hooks' per-module inputs and batch length of forward passes whose
      backward never ran; Opacus clears them only as its backward hook consumes them.
    """
    optimizer._step_skip_queue.clear()
    optimizer._is_last_step_skipped = False
    for p in optimizer.params:
        p.summed_grad = None
        p.grad_sample = None
        for attr in ("_current_grad_sample", *param_attrs):
            if hasattr(p, attr):
                delattr(p, attr)
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0
    for m in module.modules():
        if hasattr(m, "activations"):
            m.activations = []
        if hasattr(m, "max_batch_len"):
            del m.max_batch_len


def leave_empty_backward(optimizer, *, ghost: bool) -> None:
    """What a backward pass over zero examples leaves for the DPOptimizer, so that its step adds the noise alone: no
    per-sample gradient rows (hooks, book-keeping, functorch) or a zero summed gradient (ghost clipping).

    Fields: ``p.grad_sample`` (a ``[0, *p.shape]`` tensor) or ``p.grad``. No public API: Opacus only fills them from
    its hooks during a backward pass, and a model cannot run on zero rows (diffusers' attention fails on them).
    """
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
