"""``PrivacyConfig``: the DP-SGD settings of one training run, and their validation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import UserInputError
from .accounting import ACCOUNTANTS, compute_sample_rate, epsilon_after, plan_steps

#: Per-sample gradient back-ends (Opacus ``grad_sample_mode``) this package supports.
GRAD_SAMPLE_MODES = ("hooks", "bookkeeping", "functorch", "ghost")

#: Cap of the default delta (the value most DP image-generation papers report).
DEFAULT_MAX_DELTA = 1e-5


def default_delta(dataset_size: int) -> float:
    """The delta used when none is given: the largest power of ten <= 1 / (10 N), capped at 1e-5.

    Why: delta must be well below 1/N, since a mechanism that publishes one random training example outright is
    (0, 1/N)-DP; a factor of 10 below 1/N is the usual margin, a power of ten keeps reports readable, and 1e-5 is the
    value most papers use for datasets up to 10,000 examples. MNIST (N = 60,000) gets 1e-6; pass ``--delta 1e-5``
    explicitly to match papers that used 1e-5 there.
    """
    return min(DEFAULT_MAX_DELTA, 10.0 ** math.floor(math.log10(1.0 / (10.0 * dataset_size))))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class PrivacyConfig:
    """DP-SGD settings. Batch sizes count *examples*; with noise multiplicity K each example becomes K loss rows."""

    target_epsilon: float | None = field(
        default=10.0,
        metadata={
            "help": "Privacy budget epsilon. The noise multiplier is calibrated so that the planned steps spend at "
            "most this, and training stops before any step that would exceed it. None: no target (then "
            "noise_multiplier must be set)."
        },
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Privacy parameter delta; must be < 1/N. None: the largest power of ten <= 1/(10 N), capped at "
            "1e-5 (see default_delta)."
        },
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Noise standard deviation in units of max_grad_norm. None: calibrated from target_epsilon over "
            "the planned steps. Set it to fix the noise instead; with a target_epsilon too, training stops when the "
            "budget is spent."
        },
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Per-example gradient clipping norm C (L2 over all trained parameters)."}
    )
    accountant: str = field(
        default="prv", metadata={"help": f"Privacy accountant: one of {', '.join(ACCOUNTANTS)} (Opacus)."}
    )
    grad_sample_mode: str = field(
        default="bookkeeping",
        metadata={
            "help": "Per-sample gradients: 'hooks' (Opacus' per-layer samplers; every trained layer needs one), "
            "'bookkeeping' (the default: hooks, but linear weights that see few positions are clipped from ghost "
            "norms and one GEMM, without per-sample gradient tensors: the same step, less memory), 'functorch' "
            "(torch.func for every layer) or 'ghost' (Opacus' ghost clipping: a second backward pass; "
            "noise_multiplicity must be 1)."
        },
    )
    noise_multiplicity: int = field(
        default=1,
        metadata={
            "help": "K: each example appears K times in the loss (e.g. K diffusion noise draws); its K losses are "
            "averaged before its one gradient is clipped, so K does not change the privacy cost."
        },
    )
    expected_batch_size: int = field(
        metadata={
            "help": "Expected logical batch size B (examples). The sample rate is B / N: each example joins each "
            "logical batch independently with that probability (Poisson sampling)."
        }
    )
    max_physical_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Most examples in one forward/backward pass (memory bound); a logical batch is split into "
            "physical ones. With multiplicity K a pass holds up to K times as many rows. None: the logical size."
        },
    )
    epochs: float | None = field(
        default=None,
        metadata={
            "help": "Planned passes over the data; planned steps = ceil(epochs * int(N / B)). May be fractional."
        },
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Planned logical steps; overrides epochs when both are set."}
    )
    disable_dp: bool = field(
        default=False,
        metadata={"help": "Train without differential privacy (same loop, shuffled batches, no clipping or noise)."},
    )

    @property
    def physical_batch_size(self) -> int:
        """Examples per physical batch (``max_physical_batch_size``, defaulting to the logical batch size)."""
        return self.max_physical_batch_size or self.expected_batch_size

    def resolve_delta(self, *, dataset_size: int) -> float | None:
        """The delta in force: the given one, else :func:`default_delta`; None when DP is disabled."""
        if self.disable_dp:
            return None
        return self.delta if self.delta is not None else default_delta(dataset_size)

    def planned_steps(self, *, dataset_size: int) -> int | None:
        """Planned logical steps for a training set of ``dataset_size`` examples (None: train until the budget)."""
        q = compute_sample_rate(expected_batch_size=self.expected_batch_size, dataset_size=dataset_size)
        return plan_steps(sample_rate=q, epochs=self.epochs, max_steps=self.max_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, *, dataset_size: int) -> None:
        """Raise :class:`UserInputError` (one line naming the flag to change) for inconsistent settings."""
        n = dataset_size
        if not isinstance(n, int) or n <= 0:
            raise UserInputError(f"The training set is empty (dataset_size={n!r}): check the dataset path and split.")
        self._validate_batches(n)
        self._validate_schedule()
        if self.disable_dp:
            return
        self._validate_privacy(n)

    def _validate_batches(self, n: int) -> None:
        b = self.expected_batch_size
        if not isinstance(b, int) or b < 1:
            raise UserInputError(f"`expected_batch_size` must be a positive integer, got {b!r}.")
        p = self.max_physical_batch_size
        if p is not None:
            if not isinstance(p, int) or p < 1:
                raise UserInputError(f"`max_physical_batch_size` must be a positive integer, got {p!r}.")
            if p > b:
                raise UserInputError(
                    f"`max_physical_batch_size` ({p}) exceeds the logical batch size "
                    f"`expected_batch_size` ({b}): lower it to at most {b}."
                )
        if n < b:
            raise UserInputError(
                f"The training set has {n} examples, fewer than the logical batch `expected_batch_size` "
                f"({b}): lower `expected_batch_size` to at most {n}."
            )
        k = self.noise_multiplicity
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserInputError(f"`noise_multiplicity` must be an integer >= 1, got {k!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UserInputError(
                f"Unknown `grad_sample_mode` {self.grad_sample_mode!r}: use one of {', '.join(GRAD_SAMPLE_MODES)}."
            )
        if self.grad_sample_mode == "ghost" and k > 1 and not self.disable_dp:
            raise UserInputError(
                f"`grad_sample_mode` ghost cannot average an example's {k} noise draws before clipping "
                f"(it only sees per-row gradient norms): use `grad_sample_mode` hooks or "
                f"`noise_multiplicity` 1."
            )

    def _validate_schedule(self) -> None:
        if self.epochs is not None and (not _is_number(self.epochs) or self.epochs <= 0):
            raise UserInputError(f"`epochs` must be a positive number, got {self.epochs!r}.")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1
        ):
            raise UserInputError(f"`max_steps` must be a positive integer, got {self.max_steps!r}.")
        no_plan = self.epochs is None and self.max_steps is None
        if no_plan and (self.disable_dp or self.noise_multiplier is None or self.target_epsilon is None):
            raise UserInputError(
                "Set `epochs` or `max_steps` (training runs until its budget is spent only with "
                "both `noise_multiplier` and `target_epsilon`)."
            )

    def _validate_privacy(self, n: int) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise UserInputError(f"Unknown `accountant` {self.accountant!r}: use one of {', '.join(ACCOUNTANTS)}.")
        c = self.max_grad_norm
        if not _is_number(c) or c <= 0:
            raise UserInputError(f"`max_grad_norm` must be a positive number, got {c!r}.")
        eps, sigma = self.target_epsilon, self.noise_multiplier
        if eps is not None and (not _is_number(eps) or eps <= 0):
            raise UserInputError(f"`target_epsilon` must be a positive number, got {eps!r}.")
        if sigma is not None and (not _is_number(sigma) or sigma < 0):
            raise UserInputError(f"`noise_multiplier` must be a number >= 0, got {sigma!r}.")
        if eps is None and sigma is None:
            raise UserInputError(
                "Set `target_epsilon` (to calibrate the noise) or `noise_multiplier`, "
                "or pass `disable_dp` to train without privacy."
            )
        if sigma == 0 and eps is not None:
            raise UserInputError(
                "`noise_multiplier` 0 adds no noise, so no finite `target_epsilon` holds: "
                "drop `noise_multiplier` to calibrate it from `target_epsilon`."
            )
        delta = self.resolve_delta(dataset_size=n)
        if not _is_number(delta) or delta <= 0 or delta >= 1.0 / n:
            raise UserInputError(
                f"`delta` must be in (0, 1/N) = (0, {1.0 / n:.3g}) for N={n} examples, got {delta!r}; "
                f"e.g. `delta` {default_delta(n):g}."
            )
        steps = self.planned_steps(dataset_size=n)
        if sigma is not None and eps is not None and steps is not None:
            q = compute_sample_rate(expected_batch_size=self.expected_batch_size, dataset_size=n)
            spent = epsilon_after([(sigma, q, steps)], accountant=self.accountant, delta=delta)
            if spent > eps:
                raise UserInputError(
                    f"`noise_multiplier` {sigma:g} spends epsilon {spent:.3g} over the planned {steps} "
                    f"steps, more than `target_epsilon` {eps:g}: drop `noise_multiplier` to "
                    f"calibrate it from `target_epsilon`, or drop `target_epsilon` "
                    "(or plan fewer steps)."
                )
