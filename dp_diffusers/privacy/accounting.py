"""Privacy accounting: sample rate, step planning, noise calibration, epsilon and the budget guard.

Everything here is a thin layer over Opacus' accountants (``opacus.accountants``). What this module adds:

* the sample rate is ``expected_batch_size / dataset_size`` exactly. ``PrivacyEngine.make_private`` instead uses
  ``1 / len(data_loader)``, which differs from ``B / N`` whenever ``N`` is not a multiple of ``B``;
* epsilon is always computed on a *fresh* accountant built from a (compacted) history, so asking "what if" never
  mutates the accountant that records the real steps;
* :class:`EpsilonBudget` answers "would one more step exceed the target?" in O(1) per step: the PRV accountant takes
  up to a second per ``get_epsilon`` call on long histories, far too slow to call once per training step;
* the PRV accountant's FFTs run on ``numpy.fft`` (:class:`_NumpyFFT`), not ``scipy.fft``: see there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from decimal import ROUND_CEILING, Decimal

import numpy as np
import scipy.fft
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from ..errors import UserInputError
from ..runtime import transient_heap

#: Accountants Opacus ships; "prv" is the tightest and the one DP-LDM used.
ACCOUNTANTS = ("prv", "rdp", "gdp")

#: One accountant history entry, as Opacus stores it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]

# Gallop ceiling for EpsilonBudget: beyond this many steps a budget counts as unlimited.
_MAX_STEPS = 2**40


def compute_sample_rate(*, expected_batch_size: int, dataset_size: int) -> float:
    """Poisson sampling rate ``q = expected_batch_size / dataset_size``: each example joins a logical batch w.p. q."""
    if dataset_size <= 0:
        raise UserInputError(f"The training set is empty (dataset_size={dataset_size}).")
    return expected_batch_size / dataset_size


def steps_per_epoch(*, sample_rate: float) -> int:
    """Logical steps in one pass of a Poisson loader: ``int(1 / q)``, as Opacus' ``UniformWithReplacementSampler``."""
    return max(1, int(1 / sample_rate))


def plan_steps(*, sample_rate: float, epochs: float | None, max_steps: int | None) -> int | None:
    """Planned logical steps: ``max_steps`` when given (it wins, as ``--max_train_steps`` does in diffusers'
    scripts), else ``ceil(epochs * steps_per_epoch)``; ``None`` when neither is given."""
    if max_steps is not None:
        return int(max_steps)
    if epochs is None:
        return None
    # The small slack keeps 3.0 * 4 from becoming 13 through float round-off.
    return max(1, math.ceil(epochs * steps_per_epoch(sample_rate=sample_rate) - 1e-9))


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant ("prv", "rdp" or "gdp")."""
    if name not in ACCOUNTANTS:
        raise UserInputError(f"Unknown accountant {name!r}: set `accountant` to one of {', '.join(ACCOUNTANTS)}.")
    with warnings.catch_warnings():
        # GaussianAccountant warns that it is experimental on every construction; the config warns once instead.
        warnings.simplefilter("ignore")
        return create_accountant(mechanism=name)


def compact_history(history: Iterable[Sequence]) -> list[HistoryEntry]:
    """Merge consecutive entries with equal (noise_multiplier, sample_rate), as Opacus' ``step`` does, and drop
    zero-step entries. Composition is order-independent, so this changes no epsilon, only the cost to compute it."""
    out: list[HistoryEntry] = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def history_steps(history: Iterable[Sequence]) -> int:
    """Total number of steps recorded in an accountant history."""
    return sum(int(steps) for _, _, steps in history)


class _NumpyFFT:
    """A ``scipy.fft`` backend (scipy's public ``set_backend`` protocol) that runs the transforms on ``numpy.fft``.

    Why: ``scipy.fft`` keeps the plans of its last 16 transform lengths. Opacus' PRV accountant transforms a domain
    whose length grows with the step count, so a run that shows epsilon every 10 steps asks for a new length almost
    every time, and lengths with large prime factors get Bluestein plans of ~40 MB each: resident memory grew by
    ~300 MB over a 2,000-step run (measured, ``benchmarks/soak.py``). ``numpy.fft`` (the same pocketfft algorithm)
    keeps no plans. Functions numpy lacks fall back to scipy's own backend."""

    __ua_domain__ = "numpy.scipy.fft"
    _KEEP = {"n", "s", "axis", "axes", "norm"}

    @classmethod
    def __ua_function__(cls, method, args, kwargs):
        function = getattr(np.fft, method.__name__, None)
        if function is None or kwargs.get("overwrite_x") or kwargs.get("plan") is not None:
            return NotImplemented
        return function(*args, **{k: v for k, v in kwargs.items() if k in cls._KEEP})


def epsilon_after(history: Iterable[Sequence], *, accountant: str, delta: float) -> float:
    """Epsilon spent by ``history`` (a list of (noise_multiplier, sample_rate, steps)) at ``delta``.

    0.0 for an empty history and ``inf`` when any step used no noise. The real accountant is never touched.
    """
    entries = compact_history(history)
    if not entries:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in entries):
        return math.inf
    if accountant == "gdp" and len(entries) > 1:
        # GaussianAccountant only reads its last entry: it would silently under-count a heterogeneous history.
        raise ValueError("The gdp accountant supports a constant noise_multiplier and sample_rate only.")
    acc = make_accountant(accountant)
    acc.history = entries
    with warnings.catch_warnings():
        if accountant == "prv":
            # PRV bounds its numerical domain with an internal RDP accountant, whose "Optimal order is the largest
            # alpha" warning (at very large or small sigma) concerns that domain bound, not the epsilon reported.
            warnings.filterwarnings("ignore", message="Optimal order is the")
        # Its working memory grows with the step count: returned to the system after each call (runtime.py).
        with scipy.fft.set_backend(_NumpyFFT), transient_heap():
            return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier (within Opacus' 0.01 epsilon tolerance) that keeps ``steps`` steps at ``sample_rate``
    within ``(target_epsilon, delta)``; a thin wrapper over ``opacus.accountants.utils.get_noise_multiplier``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise UserInputError(
            f"No noise level reaches epsilon {target_epsilon} in {steps} steps at sample rate {sample_rate:.4g} "
            f"({err}): raise `target_epsilon`, or train fewer steps (`epochs` / `max_steps`)."
        ) from err


def would_exceed(
    accountant: IAccountant,
    *,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    steps: int = 1,
) -> bool:
    """True if ``steps`` more steps at (noise_multiplier, sample_rate) would push ``accountant``'s epsilon over
    ``target_epsilon``. Computed on a copy of its history: ``accountant`` is not modified."""
    history = list(accountant.history) + [(noise_multiplier, sample_rate, steps)]
    return epsilon_after(history, accountant=accountant.mechanism(), delta=delta) > target_epsilon


class EpsilonBudget:
    """Fast answers to "does a run of ``steps`` total steps at a constant (sigma, q) exceed ``target_epsilon``?".

    Epsilon grows with the number of steps, so the answers are a threshold: steps <= L are within budget, steps > L
    are not. The class keeps the largest step count known to be safe and the smallest known to be unsafe, and
    evaluates the accountant only to tighten them: one evaluation at ``hint_steps`` (the planned steps) usually
    settles a whole run; otherwise a gallop and a bisection (O(log L) evaluations) find L once. Every evaluation is
    :func:`epsilon_after` on the single history entry ``(sigma, q, T)``: the same number the engine will report
    after T steps, so the run never stops at a step count whose reported epsilon exceeds the target.
    """

    def __init__(
        self,
        *,
        accountant: str,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        target_epsilon: float,
        hint_steps: int | None = None,
    ):
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.target_epsilon = target_epsilon
        self._hint = hint_steps
        self._safe = 0  # epsilon(0) = 0
        self._unsafe: int | None = None
        self._cache: dict[int, float] = {}

    def epsilon(self, steps: int) -> float:
        if steps not in self._cache:
            history = [(self.noise_multiplier, self.sample_rate, steps)]
            self._cache[steps] = epsilon_after(history, accountant=self.accountant, delta=self.delta)
        return self._cache[steps]

    def _probe(self, steps: int) -> bool:
        """Evaluate ``steps``, tighten the bracket, return True if it exceeds the target."""
        if self.epsilon(steps) <= self.target_epsilon:
            self._safe = max(self._safe, steps)
            return False
        self._unsafe = steps if self._unsafe is None else min(self._unsafe, steps)
        return True

    def _locate(self, start: int) -> None:
        """Gallop up from ``start`` until a step count exceeds the budget, then bisect to the exact threshold."""
        probe = max(start, self._safe + 1)
        while self._unsafe is None:
            if not self._probe(probe) and probe >= _MAX_STEPS:
                return
            probe = min(2 * probe, _MAX_STEPS)
        while self._unsafe - self._safe > 1:
            self._probe((self._safe + self._unsafe) // 2)

    def exceeds(self, steps: int) -> bool:
        """True if a run totalling ``steps`` steps would spend more than ``target_epsilon``."""
        if steps <= self._safe:
            return False
        if self._unsafe is not None and steps >= self._unsafe:
            return True
        if self._hint is not None and steps <= self._hint and self._hint not in self._cache:
            self._probe(self._hint)  # one evaluation usually covers the whole planned run
            return self.exceeds(steps)
        if self._unsafe is None and self._hint is not None:
            return self._probe(steps)  # past the plan (rare): one evaluation per question
        self._locate(steps)
        return self._unsafe is not None and steps >= self._unsafe

    def max_steps(self) -> int:
        """The largest step count within budget (evaluates the accountant O(log L) times)."""
        self._locate(self._safe + 1)
        return self._safe


def ceil_epsilon(epsilon: float, *, digits: int = 4) -> float:
    """``epsilon`` rounded UP to ``digits`` significant digits: a shortened epsilon must never understate the
    privacy cost (9.9926 -> 9.993, not 9.99). Decimal arithmetic, so that a value already short stays as it is."""
    if epsilon is None or not math.isfinite(epsilon) or epsilon <= 0:
        return epsilon
    value = Decimal(repr(float(epsilon)))
    exponent = value.adjusted() - digits + 1
    return float(value.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_CEILING))


def format_epsilon(epsilon: float | None, *, digits: int = 4) -> str:
    """``epsilon`` for people: rounded up to ``digits`` significant digits (``ceil_epsilon``), no trailing zeros."""
    if epsilon is None:
        return "n/a"
    if not math.isfinite(epsilon):
        return str(epsilon)
    return f"{ceil_epsilon(epsilon, digits=digits):.{digits}g}"
