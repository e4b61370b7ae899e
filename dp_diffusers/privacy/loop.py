"""``LoopState``: where the engine's training loop stands, and the checks that keep a caller's loop in step with it.

Each physical batch that :meth:`DPEngine.physical_batches` yields goes through one cycle of phases::

    IDLE --yield batch--> AWAITING_BACKWARD --backward()--> AWAITING_STEP --step()--> IDLE

and, across physical batches, a logical batch is *open* from its first physical batch until the step that closes it
(the one that clips, noises and updates). Calling ``backward`` or ``step`` out of turn, or drawing the next batch
before both ran, raises RuntimeError; leaving the loop while a logical batch is open makes the engine discard its
partial sums (:meth:`reset`).
"""

from __future__ import annotations

import enum

import torch


class Phase(enum.Enum):
    """What the current physical batch still needs."""

    IDLE = "idle"  # nothing: the next physical batch may be drawn
    AWAITING_BACKWARD = "awaiting_backward"  # a batch was yielded: engine.backward() is due
    AWAITING_STEP = "awaiting_step"  # backward ran: engine.step() is due


class LoopState:
    """The phase of the current physical batch, whether a logical batch is open, and the examples in the batch."""

    def __init__(self):
        self.phase = Phase.IDLE
        self.logical_batch_open = False
        self.batch_examples: int | None = None

    def check_next_batch(self) -> None:
        if self.phase is not Phase.IDLE:
            raise RuntimeError("Call engine.backward(...) and engine.step() for every physical batch.")

    def batch_yielded(self, examples: int | None) -> None:
        self.logical_batch_open = True
        self.phase = Phase.AWAITING_BACKWARD
        self.batch_examples = examples

    def check_backward(self) -> None:
        if self.phase is not Phase.AWAITING_BACKWARD:
            raise RuntimeError("engine.backward() runs once per batch from engine.physical_batches(), then step().")

    def backward_done(self) -> None:
        self.phase = Phase.AWAITING_STEP

    def check_step(self) -> None:
        if self.phase is not Phase.AWAITING_STEP:
            raise RuntimeError("engine.step() follows engine.backward() on a batch from engine.physical_batches().")

    def step_done(self, *, taken: bool) -> None:
        self.phase = Phase.IDLE
        if taken:
            self.logical_batch_open = False

    def reset(self) -> None:
        """A partial logical batch was discarded: nothing pending, nothing open."""
        self.phase = Phase.IDLE
        self.logical_batch_open = False

    @property
    def batch_is_empty(self) -> bool:
        """The physical batch in progress holds no example (an empty Poisson draw)."""
        return self.phase is not Phase.IDLE and self.batch_examples == 0


def loss_rows(per_row_loss, *, examples: int | None, multiplicity: int) -> int:
    """Rows of ``per_row_loss``, after checking it holds one unreduced loss per row: ``examples * multiplicity``
    rows (``examples`` None: unknown, then only a multiple of ``multiplicity``). Raises ValueError otherwise."""
    n, k = examples, multiplicity
    if not isinstance(per_row_loss, torch.Tensor) or per_row_loss.dim() != 1:
        shape = tuple(per_row_loss.shape) if isinstance(per_row_loss, torch.Tensor) else type(per_row_loss)
        raise ValueError(
            f"The loss must be unreduced, one value per row: shape [{n if n is not None else 'B'} * {k}], got "
            f"{shape}. Reduce all other dimensions (e.g. .mean(dim=(1, 2, 3))) but not the batch."
        )
    rows = per_row_loss.shape[0]
    if (n is not None and rows != n * k) or rows % k:
        raise ValueError(
            f"The loss has {rows} rows but the physical batch has {n} examples x noise_multiplicity {k} = "
            f"{None if n is None else n * k}: repeat each example K times, example-major (see repeat_rows)."
        )
    return rows
