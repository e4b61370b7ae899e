"""Where DP-SGD's randomness comes from: the Gaussian noise and the Poisson sampling masks.

DP-SGD's guarantee rests on two secrets: the noise added to each step's clipped sum, and which examples each step
sampled. Anyone who can replay either (from a published seed, a logged RNG state, a checkpoint) can subtract the
noise, or lose the amplification by subsampling: with the seed of a run in its published ``training_args.json``, a
neighbour who knows every private example but one can replay training with and without it and match the release
bit for bit. So:

* by default both are drawn from generators seeded with 63 bits of the operating system's entropy (``secrets``),
  on every process that draws; the seeds and the generators' states are never stored, logged or returned by any
  public API, and a resumed run draws fresh ones;
* the noise is sampled the way Opacus' ``secure_mode`` does (``_generate_noise``: the sum of four Gaussians,
  halved, after a discarded draw), which defeats the floating-point attacks on naive Gaussian sampling (Jin et al.
  2021). Opacus' other half of ``secure_mode``, a cryptographically secure generator, needs ``torchcsprng``, which
  has no release for current torch (no wheel on PyPI); when it is importable it is used, and
  :func:`noise_source_description` says which generator ran;
* a reproducible run (tests, debugging) is an explicit, labelled choice: ``seeded(seed)`` sources. Its release is NOT
  differentially private against anyone who knows the seed, and every output says so.

The loss-side randomness (timesteps, diffusion noise, label dropout, initialisation) may stay reproducible from a
public seed: DP-SGD's guarantee holds for any such choice that does not depend on the private data.

Why by hand: Opacus seeds nothing itself (``generator=None`` means torch's global generator, which training scripts
seed from ``--seed``), and its secure generator cannot be installed here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

#: Kinds of randomness source, as written to ``privacy.json``.
OS_ENTROPY = "os_entropy"
CSPRNG = "csprng"
SEEDED = "seeded"
CALLER = "caller_generator"


def _secret_seed() -> int:
    """63 bits from the operating system's entropy pool (``secrets``); never stored."""
    return secrets.randbits(63)


def csprng_available() -> bool:
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RandomnessSource:
    """How the engine seeds a generator: ``kind`` is ``os_entropy`` (the default), ``seeded`` (reproducible from
    ``seed``: NOT a valid DP release) or ``caller_generator`` (a generator the caller built). The seed is kept only
    for ``seeded`` sources, where it is public by construction."""

    kind: str = OS_ENTROPY
    seed: int | None = None

    @classmethod
    def seeded(cls, seed: int) -> RandomnessSource:
        return cls(kind=SEEDED, seed=int(seed))

    @property
    def secret(self) -> bool:
        """True when nobody, the person who ran training included, can replay the draws."""
        return self.kind in (OS_ENTROPY, CSPRNG)

    def generator(self, *, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        """A new generator on ``device``. ``offset`` separates streams of a seeded source (e.g. per rank)."""
        if self.kind == OS_ENTROPY and csprng_available() and torch.device(device).type == "cpu":
            import torchcsprng

            return torchcsprng.create_random_device_generator("/dev/urandom")
        g = torch.Generator(device=device)
        g.manual_seed(_secret_seed() if self.kind == OS_ENTROPY else (self.seed * 1_000_003 + offset) % 2**63)
        return g

    def generator_kind(self, device: torch.device | str = "cpu") -> str:
        if self.kind == OS_ENTROPY and csprng_available() and torch.device(device).type == "cpu":
            return CSPRNG
        return self.kind


def noise_source_description(kind: str) -> str:
    """One line for ``privacy.json`` and the card."""
    return {
        CSPRNG: "torchcsprng's cryptographically secure generator (/dev/urandom)",
        OS_ENTROPY: "torch's generator seeded with 63 bits of OS entropy (secrets), never stored; not a "
        "cryptographically secure generator (torchcsprng is not installable for this torch)",
        SEEDED: "noise reproducible from the seed: NOT a valid DP release",
        CALLER: "a generator supplied by the caller (not certified by dp-diffusers)",
    }[kind]


def randomness_report(*, noise: str | None, sampling: str | None) -> dict:
    """Where the noise and the Poisson masks came from (kinds, never seeds or states), and whether that makes a
    valid DP release: only when both were secret."""
    valid = noise in (OS_ENTROPY, CSPRNG) and sampling in (OS_ENTROPY, CSPRNG)
    return {
        "noise": noise,
        "sampling": sampling,
        "noise_source": None if noise is None else noise_source_description(noise),
        "sampling_source": None if sampling is None else noise_source_description(sampling),
        "gaussian_sampling": "Opacus secure_mode (sum of 4 Gaussians, against floating-point attacks)",
        "valid_dp_release": valid,
    }
