"""Empirical privacy audit of a DP-LDM run: the one-run canary audit of Steinke, Nasr and Jagielski (NeurIPS 2023,
"Privacy auditing with one (1) training run", arXiv 2305.08846).

Each of ``m`` canaries is included independently with probability 1/2 (OS entropy), one model is trained, every
canary is scored (higher = more member-like), and the scores of the included and excluded canaries are turned into
lower bounds on epsilon at a confidence level. A lower bound above the accounted epsilon would falsify the claim; a
clearly positive bound with privacy switched off shows that the audit has power.

Two settings:

- **White-box** (:func:`run_white_box`), auditing the DP engine (:class:`dp_diffusers.privacy.DPEngine`). A canary
  is a crafted per-example gradient: a Dirac gradient (the white-box canary of Steinke et al.) of norm
  ``canary_norm`` (default 2 C, so it must be clipped) on one trained coordinate; canaries sit on distinct
  coordinates, so their unit directions are orthogonal. In each logical step every included canary joins with the
  real examples' sample rate q (so the accountant's assumptions hold) as one more row of every ``p.grad_sample``,
  and goes through Opacus' own ``clip_and_accumulate`` -> ``add_noise`` -> ``scale_grad`` -> ``step``. Plain SGD
  keeps the update linear in the noisy gradients, so the score, the total update of the trained parameters along
  the canary's direction (negated: SGD steps against the gradient), measured in units of one clipped canary
  contribution, is the number of steps the canary joined plus Gaussian noise of standard deviation
  ``sigma * C / c * sqrt(T)`` plus what the real data moved that coordinate. ``audit.json`` records both numbers,
  so a wrong noise scale, a missed clip or a mis-counted step shows up directly, besides the bound.
- **Black-box** (:func:`run_black_box`), auditing the whole pipeline. A canary is a distinctive image (sparse
  white blobs, a random label) added to the private data; the model is trained by ``train_dp_ldm.py`` exactly as a
  user would; the score is the canary's diffusion loss under the public base minus under the trained model, the
  mean over a fixed grid of timesteps and noise draws (the same draws for both models and every canary).

What is hand-written here and why: the canaries, the inclusion draws, the per-step Poisson draw of gradient canaries
and their injection into the engine's ``DPOptimizer`` (a wrapper of that optimizer instance's
``clip_and_accumulate``: the only way to put a crafted gradient through the same clipping, noise and scaling code
without changing the engine), the scores and the reports. Not hand-written: the bounds and the ROC AUC
(``jax_privacy.auditing.CanaryScoreAuditor``, Google DeepMind's implementation of Steinke et al. and of the f-DP
one-run bound of Mahloujifar et al. 2024), the accounting (the engine, Opacus) and the training (the engine;
``train_dp_ldm.py`` for the black-box setting). ``jax_privacy`` is imported lazily: training never needs jax.

The privacy package does not import this module; this module imports the privacy package and the model families.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserInputError

#: How to install what the bounds need; named by the one-line error when it is missing.
INSTALL_HINT = 'pip install -e ".[audit]" (from a clone) or pip install "dp-diffusers[audit]"'

#: The per-example clipping norm that means "no clipping" in the white-box power check (every real gradient and
#: every canary is far below it, so Opacus' clip factor min(1, C / norm) is exactly 1).
NO_CLIPPING = 1e12

WHITE_BOX = "white-box"
BLACK_BOX = "black-box"

#: Timesteps (of the 1,000 DDPM steps) at which black-box canaries are scored, fixed before any run.
DEFAULT_SCORE_TIMESTEPS = (10, 25, 50, 100, 150, 200, 300, 400, 600, 800)


# ---------------------------------------------------------------------------------------------------- bounds


def require_audit_extra():
    """``jax_privacy.auditing``, or a one-line :class:`UserInputError` naming the install command."""
    try:
        from jax_privacy import auditing
    except ImportError as e:
        raise UserInputError(
            f"The privacy audit needs the [audit] extra (jax-privacy, jax), which is not installed ({e.name or e}): "
            f"{INSTALL_HINT}."
        ) from None
    return auditing


def audit_bounds(*, in_scores, out_scores, delta: float, confidence: float = 0.95) -> dict:
    """Epsilon lower bounds and ROC AUC from the scores of included (``in_scores``) and excluded canaries.

    Higher scores must mean "more member-like". Both bounds are one-sided (only "included" guesses), hold with
    probability ``confidence`` and use jax_privacy's default threshold choice (a Bonferroni correction over every
    threshold, so no threshold is picked by looking at the result): ``epsilon_one_run`` (Steinke et al. 2023) and
    ``epsilon_one_run_fdp`` (Mahloujifar et al. 2024, via Gaussian f-DP). ``epsilon_lower_bound`` is the larger.
    """
    auditing = require_audit_extra()
    in_scores = np.asarray(in_scores, dtype=np.float64).ravel()
    out_scores = np.asarray(out_scores, dtype=np.float64).ravel()
    if in_scores.size == 0 or out_scores.size == 0:
        raise ValueError("Both included and excluded canaries are needed (got an empty group).")
    if not (np.all(np.isfinite(in_scores)) and np.all(np.isfinite(out_scores))):
        raise ValueError("Canary scores must be finite (did training diverge?).")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}.")
    auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
    significance = 1.0 - confidence
    one_run = float(auditor.epsilon_one_run(significance, delta))
    fdp = float(auditor.epsilon_one_run_fdp(significance, delta))
    return {
        "epsilon_lower_bound": max(one_run, fdp),
        "epsilon_one_run": one_run,
        "epsilon_one_run_fdp": fdp,
        "auc": float(auditor.attack_auroc()),
        "confidence": confidence,
        "delta": delta,
        "m": int(in_scores.size + out_scores.size),
        "m_included": int(in_scores.size),
        "threshold_strategy": "Bonferroni over all thresholds (jax_privacy default), one-sided",
    }


def draw_inclusion(m: int, *, generator: np.random.Generator | None = None) -> np.ndarray:
    """Which of ``m`` canaries are included: independent fair coins, from OS entropy unless a generator is given."""
    if m < 2:
        raise UserInputError(f"An audit needs at least 2 canaries, got {m}.")
    generator = generator or os_entropy_generator()
    return generator.random(m) < 0.5


def os_entropy_generator() -> np.random.Generator:
    """A numpy generator seeded from the operating system's entropy (``secrets``), never from a fixed seed."""
    return np.random.default_rng(secrets.randbits(128))


# ---------------------------------------------------------------------------------------------------- results


@dataclass(kw_only=True)
class AuditResult:
    """One audit: what ``audit.json`` holds (see :meth:`to_dict`)."""

    name: str
    setting: str
    disable_dp: bool
    epsilon_accounted: float | None
    delta: float
    epsilon_lower_bound: float
    epsilon_one_run: float
    epsilon_one_run_fdp: float
    auc: float
    m: int
    m_included: int
    confidence: float
    command: str
    wall_seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def write_report(result: AuditResult, output_dir: str | Path) -> None:
    """Writes ``audit.json`` and a short ``audit.md`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "audit.md").write_text(render_markdown(result))


def render_markdown(result: AuditResult) -> str:
    r = result
    claim = "none (NOT private: no noise" + (", no clipping)" if r.setting == WHITE_BOX else ")")
    if r.epsilon_accounted is not None:
        claim = f"{r.epsilon_accounted:.4g} at delta = {r.delta:g}"
    verdict = (
        "The lower bound is below the accounted epsilon: the audit found no violation."
        if r.epsilon_accounted is not None and r.epsilon_lower_bound <= r.epsilon_accounted
        else "The lower bound EXCEEDS the accounted epsilon: the privacy claim is falsified at this confidence."
        if r.epsilon_accounted is not None
        else "Without privacy, a positive lower bound shows that the audit has power."
    )
    lines = [
        f"# Privacy audit: {r.name}",
        "",
        f"One-run canary audit (Steinke, Nasr and Jagielski 2023), {r.setting}.",
        "",
        "| | |",
        "|---|---|",
        f"| setting | {r.setting} |",
        f"| canaries m (included) | {r.m} ({r.m_included}) |",
        f"| accounted epsilon | {claim} |",
        f"| empirical lower bound on epsilon (the larger of the two) | {r.epsilon_lower_bound:.3f} |",
        f"| - one-run bound (Steinke et al. 2023) | {r.epsilon_one_run:.3f} |",
        f"| - one-run f-DP bound (Mahloujifar et al. 2024) | {r.epsilon_one_run_fdp:.3f} |",
        f"| attack ROC AUC | {r.auc:.3f} |",
        f"| confidence | {r.confidence:g} (delta {r.delta:g}) |",
        f"| wall time | {r.wall_seconds:.0f} s |",
        "",
        verdict,
        "",
        "Command:",
        "",
        "```bash",
        r.command,
        "```",
        "",
    ]
    return "\n".join(lines)


def _prepare_output_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserInputError(
            f"The audit folder {out} is not empty: every audit draws fresh canaries and trains a fresh model, so "
            "pass a new --output_dir (or delete that folder)."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------- white-box


class GradientCanaries:
    """Dirac gradient canaries in the engine's ``DPOptimizer``: once per logical step, each included canary joins
    with probability ``sample_rate`` as one more row of every ``p.grad_sample``, before Opacus clips.

    ``coordinates[i]`` is canary i's index into the trained parameters flattened in ``optimizer.params`` order.
    ``counts[i]`` counts the logical steps canary i joined (excluded canaries never join).
    """

    def __init__(
        self,
        *,
        optimizer,
        coordinates: np.ndarray,
        included: np.ndarray,
        norm: float,
        sample_rate: float,
        generator: np.random.Generator | None = None,
    ):
        self.optimizer = optimizer
        self.params = list(optimizer.params)
        sizes = np.array([p.numel() for p in self.params])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        coordinates = np.asarray(coordinates, dtype=np.int64)
        if coordinates.size and (coordinates.min() < 0 or coordinates.max() >= sizes.sum()):
            raise ValueError("canary coordinates lie outside the trained parameters")
        self.coordinates = coordinates
        self.included = np.asarray(included, dtype=bool)
        self.param_index = np.searchsorted(starts, coordinates, side="right") - 1
        self.offset = coordinates - starts[self.param_index]
        self.norm = float(norm)
        self.sample_rate = float(sample_rate)
        self.generator = generator or os_entropy_generator()
        self.counts = np.zeros(coordinates.size, dtype=np.int64)
        self.logical_steps_seen = 0
        self._members = np.flatnonzero(self.included)
        self._original = None

    @contextlib.contextmanager
    def installed(self):
        """Wraps this optimizer instance's ``clip_and_accumulate`` while the context is open."""
        opt = self.optimizer
        original = opt.clip_and_accumulate

        def clip_and_accumulate():
            if all(p.summed_grad is None for p in self.params):  # the first physical batch of a logical step
                self._append_rows()
            return original()

        opt.clip_and_accumulate = clip_and_accumulate
        try:
            yield self
        finally:
            del opt.clip_and_accumulate  # back to the class's method

    def _append_rows(self) -> None:
        from .privacy.bookkeeping import BOOKKEEPING_INPUTS

        self.logical_steps_seen += 1
        joined = self._members[self.generator.random(self._members.size) < self.sample_rate]
        if joined.size == 0:
            return
        n = joined.size
        for index, p in enumerate(self.params):
            grad_sample = p.grad_sample
            if not isinstance(grad_sample, torch.Tensor):
                raise RuntimeError("white-box canaries need one per-sample gradient tensor per parameter")
            mine = np.flatnonzero(self.param_index[joined] == index)
            book = getattr(p, BOOKKEEPING_INPUTS, None)
            if book is not None:
                # A book-keeping weight holds per-example squared norms [B] and (activations [B, T, in], backprops
                # [B, T, out], scale), its per-example gradient being scale * backprops_i^T activations_i: a Dirac
                # canary at (o, i) is activations e_i and backprops (c / scale) e_o at one position.
                activations, backprops, scale = book
                d_out, d_in = p.shape
                extra_a = activations.new_zeros((n, activations.shape[1], d_in))
                extra_g = backprops.new_zeros((n, backprops.shape[1], d_out))
                squares = grad_sample.new_zeros(n)
                if mine.size:
                    offsets = torch.as_tensor(self.offset[joined[mine]])
                    rows = torch.as_tensor(mine)
                    extra_a[rows, 0, offsets % d_in] = 1.0
                    extra_g[rows, 0, offsets // d_in] = self.norm / float(scale)
                    squares[rows] = self.norm**2
                setattr(
                    p, BOOKKEEPING_INPUTS, (torch.cat([activations, extra_a]), torch.cat([backprops, extra_g]), scale)
                )
                p.grad_sample = torch.cat([grad_sample, squares])
                continue
            extra = torch.zeros((n, p.numel()), dtype=grad_sample.dtype, device=grad_sample.device)
            if mine.size:
                extra[torch.as_tensor(mine), torch.as_tensor(self.offset[joined[mine]])] = self.norm
            p.grad_sample = torch.cat([grad_sample, extra.view(n, *p.shape)])
        self.counts[joined] += 1


@dataclass(kw_only=True)
class WhiteBoxConfig:
    """A white-box audit of the DP engine with Dirac gradient canaries (see the module docstring)."""

    num_canaries: int = field(default=5000, metadata={"help": "m: gradient canaries (each on its own coordinate)."})
    epsilon: float | None = field(default=10.0, metadata={"help": "Target epsilon (calibrates the noise)."})
    noise_multiplier: float | None = field(default=None, metadata={"help": "Set sigma directly instead."})
    disable_dp: bool = field(
        default=False,
        metadata={
            "help": "Power check: no noise (sigma = 0) and no clipping (C = 1e12), through the same DPOptimizer "
            "code path; not private."
        },
    )
    max_grad_norm: float = field(default=1e-3, metadata={"help": "C, as train_dp_ldm.py's default."})
    canary_norm: float | None = field(
        default=None,
        metadata={"help": "Norm of each canary gradient. Default: 2 C (clipped to C); 1.0 with disable_dp."},
    )
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Public base (default: the shipped digit model)."}
    )
    dataset_name: str = field(default="digits", metadata={"help": "Private data (as train_dp_ldm.py)."})
    train_batch_size: int = field(default=256, metadata={"help": "Expected logical batch B."})
    max_physical_batch_size: int | None = None
    num_train_epochs: float | None = field(default=30.0, metadata={"help": "As train_dp_ldm.py's default."})
    max_train_steps: int | None = None
    learning_rate: float = field(default=1.0, metadata={"help": "Plain SGD (no momentum, no weight decay)."})
    delta: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = field(
        default="bookkeeping",
        metadata={"help": "The engine's per-example clipping: bookkeeping (train_dp_ldm.py's default) or hooks."},
    )
    cond_drop_prob: float = 0.1
    confidence: float = 0.95
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the model side (initialisation, timesteps, diffusion noise). The DP noise, the Poisson "
            "masks and the canaries draw from OS entropy, as in a release."
        },
    )
    name: str | None = None
    command: str = ""

    def resolved_canary_norm(self) -> float:
        if self.canary_norm is not None:
            return float(self.canary_norm)
        return 1.0 if self.disable_dp else 2.0 * self.max_grad_norm


def run_white_box(*, config: WhiteBoxConfig, output_dir: str | Path, progress: bool = True) -> AuditResult:
    """Trains the engine's trainable parameters with plain SGD and gradient canaries, scores them, bounds epsilon,
    and writes ``audit.json``, ``audit.md`` and ``scores.npz`` into ``output_dir`` (which must be new or empty)."""
    from tqdm.auto import tqdm

    from . import DEFAULT_PUBLIC_MODEL
    from .data import as_torch_dataset, load_image_dataset
    from .families import FamilyOptions, load_family
    from .privacy import DPEngine, PrivacyConfig
    from .trainable import TrainableConfig, select_trainable

    cfg = config
    require_audit_extra()  # fail before training, not after
    if cfg.grad_sample_mode not in ("bookkeeping", "hooks"):
        raise UserInputError(f"`grad_sample_mode` must be bookkeeping or hooks, got {cfg.grad_sample_mode!r}.")
    if cfg.num_canaries < 2:
        raise UserInputError(f"`num_canaries` must be at least 2, got {cfg.num_canaries}.")
    out = _prepare_output_dir(output_dir)
    started = time.time()
    torch.manual_seed(cfg.seed)

    family = load_family(cfg.pretrained_model_name_or_path or DEFAULT_PUBLIC_MODEL, options=FamilyOptions())
    loaded = load_image_dataset(cfg.dataset_name)
    private_set = as_torch_dataset(loaded, resolution=family.resolution, channels=family.channels)
    encoded = family.encode(private_set, progress=progress)
    select_trainable(
        family.denoiser,
        config=TrainableConfig(),
        embedder=family.embedder,
        block_classes=family.attention_block_classes,
    )
    model = family.loss_module(cond_drop_prob=cfg.cond_drop_prob).train()
    params = [p for p in model.parameters() if p.requires_grad]

    sigma = 0.0 if cfg.disable_dp else cfg.noise_multiplier
    clip = NO_CLIPPING if cfg.disable_dp else cfg.max_grad_norm
    privacy = PrivacyConfig(
        target_epsilon=None if cfg.disable_dp or cfg.noise_multiplier is not None else cfg.epsilon,
        delta=cfg.delta,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        accountant=cfg.accountant,
        grad_sample_mode=cfg.grad_sample_mode,
        expected_batch_size=cfg.train_batch_size,
        max_physical_batch_size=cfg.max_physical_batch_size,
        epochs=cfg.num_train_epochs,
        max_steps=cfg.max_train_steps,
    )
    engine = DPEngine(config=privacy, dataset_size=len(encoded))
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate)
    loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.train_batch_size)
    # No seed: the engine's own secret noise and Poisson masks, the path a release takes.
    model_dp, dp_optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader)

    total = sum(p.numel() for p in dp_optimizer.params)
    if cfg.num_canaries > total:
        raise UserInputError(
            f"`num_canaries` {cfg.num_canaries} exceeds the {total} trained coordinates (one canary per coordinate)."
        )
    entropy = os_entropy_generator()
    included = draw_inclusion(cfg.num_canaries, generator=entropy)
    coordinates = entropy.choice(total, size=cfg.num_canaries, replace=False)
    canary_norm = cfg.resolved_canary_norm()
    canaries = GradientCanaries(
        optimizer=dp_optimizer,
        coordinates=coordinates,
        included=included,
        norm=canary_norm,
        sample_rate=engine.sample_rate,
        generator=entropy,
    )
    before = _flat_values(dp_optimizer.params, coordinates)

    bar = tqdm(total=engine.planned_steps, desc=f"white-box audit ({cfg.num_canaries} canaries)", disable=not progress)
    with canaries.installed():
        while not engine.finished:
            for batch in engine.physical_batches(loader):
                engine.backward(model_dp(*batch))
                if engine.step():
                    bar.update(1)
            if engine.steps == 0 and engine.finished:
                break
    bar.close()
    after = _flat_values(dp_optimizer.params, coordinates)
    if not np.all(np.isfinite(after)):
        raise RuntimeError("training diverged (non-finite parameters); lower the learning rate")

    # One clipped canary contributes -lr * c_eff / B to its coordinate per step it joins (Opacus divides the noisy
    # sum by the expected batch size B): the score counts those contributions.
    c_eff = canary_norm * min(1.0, clip / (canary_norm + 1e-6))  # Opacus' clip factor, exactly
    unit = cfg.learning_rate * c_eff / cfg.train_batch_size
    scores = -(after - before) / unit
    steps = engine.steps
    sigma = engine.noise_multiplier
    noise_std = sigma * clip / c_eff * math.sqrt(steps)
    bounds_delta = engine.delta or 1e-5
    bounds = audit_bounds(
        in_scores=scores[included], out_scores=scores[~included], delta=bounds_delta, confidence=cfg.confidence
    )
    epsilon = engine.epsilon if sigma > 0 else None  # sigma = 0: no finite epsilon (the accountant has none)
    residual = scores - canaries.counts
    details = {
        "canary": "Dirac gradient (one trained coordinate each, distinct coordinates)",
        "canary_norm": canary_norm,
        "clipped_canary_norm": c_eff,
        "max_grad_norm": None if cfg.disable_dp else clip,
        "clipping": not cfg.disable_dp,
        "noise_multiplier": sigma,
        "sample_rate": engine.sample_rate,
        "steps": steps,
        "canary_steps_seen": canaries.logical_steps_seen,
        "trained_coordinates": total,
        "dataset_size": engine.dataset_size,
        "expected_batch_size": cfg.train_batch_size,
        "optimizer": f"SGD(lr={cfg.learning_rate})",
        "grad_sample_mode": cfg.grad_sample_mode,
        "score": "-(final - initial) at the canary's coordinate, in units of one clipped canary step (lr c / B)",
        "score_in_mean": float(scores[included].mean()),
        "score_out_mean": float(scores[~included].mean()),
        "score_out_std": float(scores[~included].std()),
        "expected_in_mean": engine.sample_rate * steps,
        "residual_std": float(residual.std()),
        "expected_noise_std": noise_std,
        "joins_per_included_canary_mean": float(canaries.counts[included].mean()) if included.any() else 0.0,
        "threshold_strategy": bounds["threshold_strategy"],
        "seed": cfg.seed,
    }
    if sigma > 0:
        details["ideal_reference"] = ideal_gaussian_reference(
            included=included,
            noise_multiplier=sigma * clip / c_eff,
            sample_rate=engine.sample_rate,
            steps=steps,
            delta=bounds_delta,
            confidence=cfg.confidence,
        )
    np.savez(out / "scores.npz", scores=scores, included=included, coordinates=coordinates, counts=canaries.counts)
    return _finish(
        out,
        bounds,
        name=cfg.name or _white_box_name(cfg, sigma),
        setting=WHITE_BOX,
        disable_dp=cfg.disable_dp or sigma == 0,
        epsilon_accounted=epsilon,
        delta=bounds_delta,
        confidence=cfg.confidence,
        command=cfg.command,
        wall_seconds=round(time.time() - started, 1),
        details=details,
    )


def _finish(out: Path, bounds: dict, **fields) -> AuditResult:
    """The run's ``AuditResult`` (its bounds and the given fields), written to ``out`` as audit.json and audit.md."""
    keys = ("epsilon_lower_bound", "epsilon_one_run", "epsilon_one_run_fdp", "auc", "m", "m_included")
    result = AuditResult(**{k: bounds[k] for k in keys}, **fields)
    write_report(result, out)
    return result


def _white_box_name(cfg: WhiteBoxConfig, sigma: float) -> str:
    if cfg.disable_dp:
        return "white-box, no noise, no clipping"
    if sigma == 0:
        return f"white-box, no noise, clipping at C = {cfg.max_grad_norm:g}"
    if cfg.noise_multiplier is not None:
        return f"white-box, sigma {sigma:g}"
    return f"white-box, epsilon {cfg.epsilon:g}"


def _flat_values(params, coordinates: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        return flat[torch.as_tensor(coordinates)].cpu().numpy()


def ideal_gaussian_reference(
    *, included: np.ndarray, noise_multiplier: float, sample_rate: float, steps: int, delta: float, confidence: float
) -> dict:
    """What the same bounds give on a simulation of the accounted mechanism itself, seen the way the white-box
    audit sees it: an included canary's score is Binomial(T, q) + N(0, sigma^2 T), an excluded one's N(0, sigma^2 T)
    (no real data). The one-run bounds from a last iterate are loose for large epsilon even there; this says how
    close the measured bound could get. Seeded (0): a deterministic reference, not a measurement."""
    rng = np.random.default_rng(0)
    included = np.asarray(included, dtype=bool)
    joins = np.where(included, rng.binomial(steps, sample_rate, included.size), 0)
    scores = joins + noise_multiplier * math.sqrt(steps) * rng.standard_normal(included.size)
    bounds = audit_bounds(in_scores=scores[included], out_scores=scores[~included], delta=delta, confidence=confidence)
    return {k: bounds[k] for k in ("epsilon_lower_bound", "epsilon_one_run", "epsilon_one_run_fdp", "auc")}


# ---------------------------------------------------------------------------------------------------- black-box


@dataclass(kw_only=True)
class BlackBoxConfig:
    """A black-box audit of ``train_dp_ldm.py`` with input canaries (see the module docstring)."""

    num_canaries: int = field(default=1000, metadata={"help": "m: canary images."})
    epsilon: float | None = field(default=10.0, metadata={"help": "--epsilon of the training run."})
    disable_dp: bool = field(default=False, metadata={"help": "Train with --disable_dp (not private)."})
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Public base (default: the shipped digit model)."}
    )
    train_args: list[str] = field(
        default_factory=list, metadata={"help": "More train_dp_ldm.py arguments (e.g. --num_train_epochs 30)."}
    )
    timesteps: tuple[int, ...] = DEFAULT_SCORE_TIMESTEPS
    noise_draws: int = field(default=4, metadata={"help": "Noise draws per timestep (shared by both models)."})
    confidence: float = 0.95
    train_script: str | None = field(default=None, metadata={"help": "train_dp_ldm.py (default: the repository's)."})
    name: str | None = None
    command: str = ""


def make_blob_canaries(m: int, *, size: int = 28, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` distinctive images (uint8 ``[m, size, size]``: 3 to 6 sparse white Gaussian blobs on black, anywhere in
    the frame, unlike a centred digit) and random labels 0..9."""
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((m, size, size), dtype=np.float64)
    for i in range(m):
        for _ in range(int(generator.integers(3, 7))):
            cy, cx = generator.uniform(2, size - 2, 2)
            r = generator.uniform(1.0, 2.5)
            images[i] = np.maximum(images[i], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8), generator.integers(0, 10, m)


def _images_parquet(path: Path, images: np.ndarray, labels, names: list[str]) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    data = {"image": [Image.fromarray(a, mode="L") for a in images], "label": [int(v) for v in labels]}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))


def _load_train_script(path: str | None):
    script = Path(path) if path else Path(__file__).resolve().parents[1] / "train_dp_ldm.py"
    if not script.is_file():
        raise UserInputError(f"train_dp_ldm.py not found at {script}: run from a clone or pass --train_script.")
    spec = importlib.util.spec_from_file_location("train_dp_ldm", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def supports_flag(script, flag: str, value: str) -> bool:
    """Whether ``script.parse_args`` accepts ``flag value`` (argparse's usage error is swallowed)."""
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            script.parse_args([flag, value])
    except SystemExit:
        return False
    return True


def train_argv(cfg: BlackBoxConfig, *, data: Path, model_dir: Path, script, class_names: list[str]) -> list[str]:
    argv = ["--dataset_name", str(data), "--output_dir", str(model_dir), "--report_to", "none"]
    if cfg.pretrained_model_name_or_path:
        argv += ["--pretrained_model_name_or_path", cfg.pretrained_model_name_or_path]
    argv += ["--disable_dp"] if cfg.disable_dp else ["--epsilon", str(cfg.epsilon)]
    names = ",".join(class_names)
    if supports_flag(script, "--class_names", names):  # the data loader may refuse unnamed labels without it
        argv += ["--class_names", names]
    return argv + list(cfg.train_args)


def run_black_box(*, config: BlackBoxConfig, output_dir: str | Path, progress: bool = True) -> AuditResult:
    """Adds the included canary images to the embedded private digits, trains with ``train_dp_ldm.py`` in this
    process, scores every canary against the public base, bounds epsilon and writes ``audit.json``, ``audit.md``,
    ``scores.npz``, the private data (``data/train.parquet``), all canaries (``canaries.parquet``) and the model
    (``model/``) into ``output_dir`` (which must be new or empty)."""
    import datasets

    from . import DEFAULT_PUBLIC_MODEL
    from .data import load_sklearn_digits

    cfg = config
    require_audit_extra()
    if cfg.num_canaries < 2:
        raise UserInputError(f"`num_canaries` must be at least 2, got {cfg.num_canaries}.")
    script = _load_train_script(cfg.train_script)
    out = _prepare_output_dir(output_dir)
    started = time.time()

    entropy = os_entropy_generator()
    included = draw_inclusion(cfg.num_canaries, generator=entropy)
    images, labels = make_blob_canaries(cfg.num_canaries, generator=entropy)
    digits = load_sklearn_digits()
    names = list(digits.features["label"].names)
    _images_parquet(out / "canaries.parquet", images, labels, names)
    canary_set = datasets.load_dataset("parquet", data_files={"train": [str(out / "canaries.parquet")]}, split="train")
    private = datasets.concatenate_datasets([digits, canary_set.select(np.flatnonzero(included))])
    (out / "data").mkdir()
    private.to_parquet(str(out / "data" / "train.parquet"))

    model_dir = out / "model"
    argv = train_argv(cfg, data=out / "data" / "train.parquet", model_dir=model_dir, script=script, class_names=names)
    (out / "train_argv.json").write_text(json.dumps(argv, indent=2))
    script.main(script.parse_args(argv))
    privacy = json.loads((model_dir / "privacy.json").read_text())

    base = cfg.pretrained_model_name_or_path or DEFAULT_PUBLIC_MODEL
    per_t = canary_loss_drop(
        base=base,
        trained=str(model_dir),
        canaries=str(out / "canaries.parquet"),
        timesteps=cfg.timesteps,
        noise_draws=cfg.noise_draws,
    )
    scores = per_t.mean(axis=1)  # loss under the base minus under the trained model: higher = more member-like
    delta = privacy.get("delta") or 1e-5
    bounds = audit_bounds(
        in_scores=scores[included], out_scores=scores[~included], delta=delta, confidence=cfg.confidence
    )
    np.savez(out / "scores.npz", scores=scores, included=included, per_timestep=per_t, timesteps=cfg.timesteps)
    details = {
        "canary": "3-6 sparse white Gaussian blobs on black, random label 0..9",
        "score": "diffusion loss under the base minus under the trained model (saved weights), mean over "
        f"timesteps {list(cfg.timesteps)} x {cfg.noise_draws} noise draws, same draws for both models",
        "private_examples": len(private),
        "train_argv": argv,
        "steps": privacy.get("steps"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "sample_rate": privacy.get("sample_rate"),
        "max_grad_norm": privacy.get("max_grad_norm"),
        "ema_decay": privacy.get("ema_decay"),
        "train_seconds": privacy.get("train_seconds"),
        "score_in_mean": float(scores[included].mean()),
        "score_out_mean": float(scores[~included].mean()),
        "auc_per_timestep": _auc_per_column(per_t, included),
        "threshold_strategy": bounds["threshold_strategy"],
    }
    eps = None if cfg.disable_dp else privacy.get("epsilon")
    return _finish(
        out,
        bounds,
        name=cfg.name or ("black-box, --disable_dp" if cfg.disable_dp else f"black-box, epsilon {cfg.epsilon:g}"),
        setting=BLACK_BOX,
        disable_dp=cfg.disable_dp,
        epsilon_accounted=eps,
        delta=delta,
        confidence=cfg.confidence,
        command=cfg.command,
        wall_seconds=round(time.time() - started, 1),
        details=details,
    )


def _auc_per_column(per_t: np.ndarray, included: np.ndarray) -> list[float]:
    """Rank AUC of each timestep's score alone (a diagnostic; the bound uses only the pre-registered mean)."""
    from scipy.stats import rankdata

    aucs = []
    n_in, n_out = int(included.sum()), int((~included).sum())
    for column in per_t.T:
        ranks = rankdata(column)
        aucs.append(float((ranks[included].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)))
    return aucs


@torch.no_grad()
def canary_loss_drop(
    *, base: str, trained: str, canaries: str, timesteps, noise_draws: int, batch_size: int = 500
) -> np.ndarray:
    """``[m, len(timesteps)]``: each canary's diffusion loss under ``base`` minus under ``trained``, averaged over
    ``noise_draws`` noise draws per timestep; the canaries' latents (means, no sampling), noise and labels (no
    dropout) are the same for both models."""
    from .data import as_torch_dataset, load_image_dataset
    from .families import FamilyOptions, load_family

    losses = []
    latents = labels = None
    for path in (base, trained):
        family = load_family(path, options=FamilyOptions())
        if latents is None:
            loaded = load_image_dataset(canaries)
            data = as_torch_dataset(loaded, resolution=family.resolution, channels=family.channels)
            latents, _, labels = family.encode(data, progress=False).tensors
        loss_module = family.loss_module(cond_drop_prob=0.0).eval()
        generator = torch.Generator().manual_seed(1234)
        m = latents.shape[0]
        per_t = torch.zeros(m, len(timesteps), dtype=torch.float64)
        for j, t in enumerate(timesteps):
            for _ in range(noise_draws):
                noise = torch.randn(latents.shape, generator=generator)
                for start in range(0, m, batch_size):
                    sl = slice(start, start + batch_size)
                    rows = latents[sl].shape[0]
                    loss = loss_module(
                        latents[sl],
                        None,
                        labels[sl],
                        timesteps=torch.full((rows,), int(t), dtype=torch.long),
                        noise=noise[sl],
                    )
                    per_t[sl, j] += loss.double() / noise_draws
        losses.append(per_t.numpy())
    return losses[0] - losses[1]
