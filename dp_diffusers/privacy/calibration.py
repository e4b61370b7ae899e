"""``Calibration``: what a run's noise is calibrated to, fixed once from the config and the dataset size.

The sample rate is exactly ``expected_batch_size / dataset_size`` (what both the Poisson sampler and the accountant
use; ``accounting.py`` says why not Opacus' ``1 / len(data_loader)``); the planned steps come from ``epochs`` or
``max_steps``; delta is the given one or ``default_delta(N)``. The noise multiplier is the config's, or else the
smallest that keeps the planned steps within ``target_epsilon`` (``calibrate_noise``). With a ``target_epsilon`` an
:class:`~.accounting.EpsilonBudget` answers "would one more step exceed it?" at every step (the budget guard).
Without DP only the sample rate and the planned steps are set.
"""

from __future__ import annotations

from dataclasses import dataclass

from .accounting import EpsilonBudget, calibrate_noise, compute_sample_rate
from .config import PrivacyConfig


@dataclass(frozen=True)
class Calibration:
    """Sample rate q, planned steps, delta and noise multiplier sigma of one run, and its budget guard."""

    sample_rate: float
    planned_steps: int | None
    delta: float | None
    noise_multiplier: float | None = None
    budget: EpsilonBudget | None = None

    @classmethod
    def from_config(cls, config: PrivacyConfig, *, dataset_size: int) -> Calibration:
        """Calibrate ``config`` (already validated) for a training set of ``dataset_size`` examples."""
        sample_rate = compute_sample_rate(expected_batch_size=config.expected_batch_size, dataset_size=dataset_size)
        planned_steps = config.planned_steps(dataset_size=dataset_size)
        delta = config.resolve_delta(dataset_size=dataset_size)
        if config.disable_dp:
            return cls(sample_rate=sample_rate, planned_steps=planned_steps, delta=delta)
        if config.noise_multiplier is not None:
            noise_multiplier = float(config.noise_multiplier)
        else:
            noise_multiplier = calibrate_noise(
                target_epsilon=config.target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=planned_steps,
                accountant=config.accountant,
            )
        budget = None
        if config.target_epsilon is not None:
            budget = EpsilonBudget(
                accountant=config.accountant,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                delta=delta,
                target_epsilon=config.target_epsilon,
                hint_steps=planned_steps,
            )
        return cls(
            sample_rate=sample_rate,
            planned_steps=planned_steps,
            delta=delta,
            noise_multiplier=noise_multiplier,
            budget=budget,
        )

    def budget_exhausted(self, steps: int) -> bool:
        """True if one more logical step after ``steps`` would push epsilon over ``target_epsilon``."""
        return self.budget is not None and self.budget.exceeds(steps + 1)

    def finished(self, steps: int) -> bool:
        """The planned steps are done or the budget is exhausted after ``steps`` logical steps."""
        planned_done = self.planned_steps is not None and steps >= self.planned_steps
        return planned_done or self.budget_exhausted(steps)
