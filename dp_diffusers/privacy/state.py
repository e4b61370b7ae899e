"""The engine's checkpoint state: what resumes the accounting, and the checks that refuse a state that cannot compose.

A state holds the accountant's history, the logical steps taken, sigma, q and N, never any randomness (no seed and
no generator state: ``randomness.py``). A resumed run must spend its budget on the same mechanism, so a state whose
DP mode, dataset size, accountant, noise multiplier or sample rate differ from the run's is refused
(:class:`~dp_diffusers.errors.UserInputError`): the epsilon reported would not be the epsilon spent.
"""

from __future__ import annotations

import math

from opacus.accountants import IAccountant

from ..errors import UserInputError
from .accounting import history_steps
from .calibration import Calibration
from .config import PrivacyConfig

#: Version of the dictionary :func:`engine_state` returns.
STATE_FORMAT = 1


def engine_state(
    *,
    config: PrivacyConfig,
    dataset_size: int,
    calibration: Calibration,
    steps: int,
    accountant: IAccountant | None,
) -> dict:
    """Everything needed to resume the accounting: history, steps, sigma, q and N."""
    private = not config.disable_dp
    return {
        "format": STATE_FORMAT,
        "private": private,
        "steps": steps,
        "noise_multiplier": calibration.noise_multiplier,
        "sample_rate": calibration.sample_rate,
        "dataset_size": dataset_size,
        "expected_batch_size": config.expected_batch_size,
        "max_grad_norm": config.max_grad_norm if private else None,
        "noise_multiplicity": config.noise_multiplicity,
        "delta": calibration.delta,
        "accountant": config.accountant if private else None,
        "history": [list(entry) for entry in accountant.history] if private else [],
    }


def restore_state(
    state_dict: dict,
    *,
    config: PrivacyConfig,
    dataset_size: int,
    calibration: Calibration,
    accountant: IAccountant | None,
) -> int:
    """Check ``state_dict`` (from :func:`engine_state`) against this run, load its history into ``accountant`` and
    return the logical steps it had taken. Raises UserInputError when the two runs' epsilons would not compose."""
    sd = state_dict
    private = not config.disable_dp
    if bool(sd.get("private")) != private:
        was = "with" if sd.get("private") else "without"
        raise UserInputError(f"The checkpoint was trained {was} DP: resume with the same `disable_dp`.")
    if sd.get("dataset_size") != dataset_size:
        raise UserInputError(
            f"The checkpoint was trained on {sd.get('dataset_size')} examples, this run has {dataset_size}: "
            "resume on the same training set."
        )
    if not private:
        return int(sd.get("steps", 0))
    if sd.get("accountant") != config.accountant:
        raise UserInputError(
            f"The checkpoint used accountant {sd.get('accountant')!r}: resume with "
            f"`accountant` {sd.get('accountant')}."
        )
    for key, flag in (("sample_rate", "expected_batch_size"), ("noise_multiplier", "noise_multiplier")):
        theirs, ours = sd.get(key), getattr(calibration, key)
        if theirs is None or not math.isclose(float(theirs), float(ours), rel_tol=1e-9, abs_tol=0.0):
            raise UserInputError(
                f"The checkpoint's {key} {theirs} differs from this run's {ours}: resume with the same "
                f"`{flag}`, `target_epsilon`, `noise_multiplier` and planned steps (`epochs` / `max_steps`)."
            )
    history = [(float(s), float(q), int(t)) for s, q, t in sd.get("history", [])]
    accountant.load_state_dict({"history": history, "mechanism": config.accountant})
    return history_steps(history)
