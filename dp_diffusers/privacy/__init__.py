"""Differentially private training (DP-SGD) for any ``nn.Module``, loss and dataset, built on Opacus.

This package knows nothing about diffusion: the training script supplies a per-row loss.
"""

# First: refuses an Opacus outside the tested range before any module reaches into Opacus' private fields.
from . import opacus_internals  # noqa: F401
from .accounting import (
    ACCOUNTANTS,
    EpsilonBudget,
    calibrate_noise,
    ceil_epsilon,
    compute_sample_rate,
    epsilon_after,
    format_epsilon,
    make_accountant,
    plan_steps,
    steps_per_epoch,
    would_exceed,
)
from .compatibility import check_trainable_modules, find_incompatible_modules
from .config import GRAD_SAMPLE_MODES, PrivacyConfig, default_delta
from .engine import DPEngine
from .multiplicity import NoiseMultiplicityMixin, reduce_rows, repeat_rows
from .optimizers import DistributedMultiplicityDPOptimizer, MultiplicityDPOptimizer
from .randomness import RandomnessSource

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "DPEngine",
    "DistributedMultiplicityDPOptimizer",
    "EpsilonBudget",
    "MultiplicityDPOptimizer",
    "NoiseMultiplicityMixin",
    "PrivacyConfig",
    "RandomnessSource",
    "calibrate_noise",
    "ceil_epsilon",
    "check_trainable_modules",
    "compute_sample_rate",
    "default_delta",
    "epsilon_after",
    "find_incompatible_modules",
    "format_epsilon",
    "make_accountant",
    "plan_steps",
    "reduce_rows",
    "repeat_rows",
    "steps_per_epoch",
    "would_exceed",
]
