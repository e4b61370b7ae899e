"""Fréchet distances: the standard Inception-v3 FID when its weights are on disk, and an offline stand-in.

- :func:`inception_fid` is the FID of DPImageBench and the papers: 2048-d Inception-v3 pool features (the
  TensorFlow 2015-12-05 weights), grayscale repeated to 3 channels and resized to 299x299, the synthetic set
  against statistics of the real *training* split. It runs through ``torch-fidelity`` (the feature extractor behind
  torchmetrics' ``FrechetInceptionDistance``) or ``clean-fid`` when one is importable *and* its weights file is
  already on disk; it never downloads. Otherwise it returns ``None`` and the reason.
- :func:`fd_classifier` is the offline fallback: the Fréchet distance in the 128-d penultimate feature space of the
  downstream CNN (:class:`~dp_diffusers.evaluation.classifier.SmallCNN`) trained on the real training data. It is not
  comparable with published FIDs and is always reported under its own name, ``fd_classifier``.

Statistics are ``(mu, sigma)`` pairs (:func:`compute_stats`) that :func:`save_stats` / :func:`load_stats` keep as
``.npz`` files, so reference statistics are computed once and FID can be computed later, on another machine, from a
samples ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from ..errors import UserInputError
from .classifier import build_classifier, to_model_input
from .downstream import accuracy, train_classifier
from .samples import _atomic_save_npz, validate_images

logger = logging.getLogger(__name__)

#: File names of the Inception-v3 weights (TF 2015-12-05) that torch-fidelity and clean-fid download.
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
CLEANFID_WEIGHTS = "inception-2015-12-05.pt"

try:  # the standard matrix square root, as pytorch-fid / torchmetrics / clean-fid use it
    from scipy import linalg as _scipy_linalg
except ImportError:  # pragma: no cover - scipy is installed here; the eigen fallback below keeps FD working
    _scipy_linalg = None


# --------------------------------------------------------------------------------------------------- statistics
def compute_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64) of ``features`` ``[N, D]``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UserInputError(f"compute_stats needs features [N >= 2, D], got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **meta) -> str:
    """Writes ``mu``, ``sigma`` (and JSON-able ``meta``) to the ``.npz`` ``path``, atomically."""
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    if meta:
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    _atomic_save_npz(Path(path), arrays)
    return str(path)


def stats_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` that :func:`save_stats` stored in ``path`` (``{}`` when there is none)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"])) if "meta" in data.files else {}
    except (OSError, ValueError, KeyError):
        return {}


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu, sigma)`` written by :func:`save_stats` (also the ``mu``/``sigma`` files of pytorch-fid)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"No statistics file {str(path)!r}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
    except (KeyError, OSError, ValueError) as e:
        raise UserInputError(f"{path} is not a statistics .npz with 'mu' and 'sigma' ({e}).") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserInputError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together.")
    return mu, sigma


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))``: scipy's ``sqrtm`` when available, else the eigenvalues of a PSD product."""
    if _scipy_linalg is not None:
        with warnings.catch_warnings():  # singular products are common (e.g. dead ReLU features); checked below
            warnings.simplefilter("ignore", _scipy_linalg.LinAlgWarning)
            covmean = _scipy_linalg.sqrtm(sigma1 @ sigma2)
            covmean = covmean[0] if isinstance(covmean, tuple) else covmean
            if not np.isfinite(covmean).all():
                logger.warning("FD: singular product; adding %g to the covariance diagonals.", eps)
                offset = np.eye(len(sigma1)) * eps
                covmean = _scipy_linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
                covmean = covmean[0] if isinstance(covmean, tuple) else covmean
        return float(np.trace(covmean).real)
    # sigma1 @ sigma2 is similar to the PSD matrix s1^1/2 sigma2 s1^1/2, whose eigenvalues are real and >= 0.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` (float64; tiny negative rounding -> 0).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise UserInputError(
            f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2, eps)
    return float(max(value, 0.0))


# ----------------------------------------------------------------------------------------------- Inception FID
Extractor = Callable[[torch.Tensor], torch.Tensor]


def _torch_fidelity_extractor(weights: Path, device) -> Extractor:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    model = model.to(device).eval()

    def extract(batch: torch.Tensor) -> torch.Tensor:  # uint8 [B, 3, H, W]; resized to 299 inside (bilinear, TF)
        return model(batch.to(device))[0].reshape(len(batch), -1)

    return extract


def _cleanfid_extractor(weights: Path, device) -> Extractor:
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()
    resize = build_resizer("clean")  # PIL bicubic to 299x299 on float pixels, clean-fid's default mode

    def extract(batch: torch.Tensor) -> torch.Tensor:
        images = np.stack([resize(img) for img in batch.permute(0, 2, 3, 1).numpy()])
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).to(device)).reshape(len(batch), -1)

    return extract


def _candidates(weights_path: str | None) -> list[tuple[str, Path]]:
    """``(backend, weights file)`` pairs to try, most standard first."""
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        return [("clean-fid" if p.suffix == ".pt" else "torch-fidelity", p)]
    return [
        ("torch-fidelity", Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS),
        ("clean-fid", Path("/tmp") / CLEANFID_WEIGHTS),
        ("clean-fid", Path.cwd() / CLEANFID_WEIGHTS),
    ]


def inception_extractor(*, weights_path: str | None = None, device="cpu") -> tuple[Extractor | None, str]:
    """Finds an offline Inception-v3 feature extractor (2048-d pool features of ``uint8`` ``[B, 3, H, W]``).

    Tries torch-fidelity's (torchmetrics' FID backbone) with ``weights-inception-2015-12-05-6726825d.pth`` in the
    torch hub cache, then clean-fid's TorchScript ``inception-2015-12-05.pt`` in ``/tmp`` or the working directory,
    or exactly ``weights_path`` (``.pth`` -> torch-fidelity, ``.pt`` -> clean-fid). Nothing is downloaded.

    Returns:
        ``(extractor, description)``, or ``(None, reason)`` when no backend and weights are available.
    """
    reasons = []
    for backend, weights in _candidates(weights_path):
        module = "torch_fidelity" if backend == "torch-fidelity" else "cleanfid"
        try:
            __import__(module)
        except ImportError:
            reasons.append(f"{backend} not installed")
            continue
        if not weights.is_file():
            reasons.append(f"no {weights}")
            continue
        try:
            make = _torch_fidelity_extractor if backend == "torch-fidelity" else _cleanfid_extractor
            return make(weights, device), f"{backend} ({weights})"
        except Exception as e:  # a corrupt or incompatible weights file: report, do not crash the evaluation
            reasons.append(f"{backend} failed to load {weights}: {type(e).__name__}: {e}")
    return None, "Inception-v3 weights unavailable offline: " + "; ".join(dict.fromkeys(reasons))


@torch.no_grad()
def inception_features(
    images: np.ndarray, *, extractor: Extractor, batch_size: int = 100, progress: bool = True
) -> np.ndarray:
    """2048-d features of ``uint8`` images ``[N, H, W, C]`` (grayscale repeated to 3 channels) as float64."""
    images = np.asarray(images)
    images = torch.from_numpy(np.ascontiguousarray(images[..., None] if images.ndim == 3 else images))
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress, leave=False):
        batch = images[i : i + batch_size].permute(0, 3, 1, 2)
        if batch.shape[1] == 1:
            batch = batch.repeat(1, 3, 1, 1)
        feats.append(extractor(batch.contiguous()).double().cpu().numpy())
    return np.concatenate(feats)


def inception_fid(
    *,
    samples: np.ndarray,
    reference: np.ndarray | None = None,
    reference_stats: str | None = None,
    weights_path: str | None = None,
    batch_size: int = 100,
    device="cpu",
    progress: bool = True,
) -> tuple[float | None, str | None]:
    """Standard FID of ``samples`` (``uint8`` ``[N, H, W, C]``) against the real training split.

    The reference is ``reference_stats`` (a :func:`save_stats` file) when that file exists and was made with the same
    backend (or records none); otherwise the statistics of ``reference`` images, which are then also saved to
    ``reference_stats`` when a path is given (a cache).

    Returns:
        ``(fid, None)``, or ``(None, reason)`` when no Inception-v3 backend with local weights is available (see
        :func:`inception_extractor`) or no reference is given.
    """
    extractor, info = inception_extractor(weights_path=weights_path, device=device)
    if extractor is None:
        return None, info
    backend = info.split(" (")[0]  # "torch-fidelity" or "clean-fid": their resizing differs slightly
    cached = reference_stats is not None and Path(reference_stats).is_file()
    if cached and reference is not None and stats_meta(reference_stats).get("backend", backend) != backend:
        logger.info("%s was made with another Inception backend; recomputing it.", reference_stats)
        cached = False
    if cached:
        mu_ref, sigma_ref = load_stats(reference_stats)
    elif reference is not None:
        mu_ref, sigma_ref = compute_stats(
            inception_features(reference, extractor=extractor, batch_size=batch_size, progress=progress)
        )
        if reference_stats is not None:
            save_stats(reference_stats, mu_ref, sigma_ref, backend=backend, n=len(reference))
    else:
        return None, "no real training images or reference statistics to compute the Inception FID against"
    mu, sigma = compute_stats(
        inception_features(samples, extractor=extractor, batch_size=batch_size, progress=progress)
    )
    logger.info("Inception FID via %s", info)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref), None


# ------------------------------------------------------------------------------------- classifier-feature FD
def default_cache_dir() -> Path:
    """``$DP_DIFFUSERS_CACHE`` or ``~/.cache/dp_diffusers``."""
    return Path(os.environ.get("DP_DIFFUSERS_CACHE", Path.home() / ".cache" / "dp_diffusers"))


@torch.no_grad()
def classifier_features(model, images: np.ndarray, *, batch_size: int = 1000, device="cpu") -> np.ndarray:
    """Penultimate-layer features (``model.features``) of ``uint8`` images ``[N, H, W, C]`` as float64."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images))
    out = [
        model.features(to_model_input(x[i : i + batch_size]).to(device)).double().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy()


def feature_classifier(
    *,
    real_x: np.ndarray,
    real_y: np.ndarray,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    device="cpu",
    progress: bool = True,
):
    """The CNN feature extractor of :func:`fd_classifier` and the real reference statistics, trained once and cached.

    The CNN is trained (``seed``, ``epochs``; no validation split) on all of ``real_x``/``real_y``. It is cached as
    ``model.safetensors`` with ``config.json`` and ``reference_stats.npz`` (its features of ``real_x``) under
    ``cache_dir/fd_classifier/<hash of the data and settings>/``; a later call with the same data loads them.

    Returns:
        ``(model in eval mode, mu, sigma, cache folder)``.
    """
    from safetensors.torch import load_file, save_file

    real_x, real_y = validate_images(real_x, real_y, source="real training set")
    config = {
        "classifier": "cnn",
        "in_channels": int(real_x.shape[-1]),
        "image_size": int(real_x.shape[1]),
        "num_classes": int(real_y.max()) + 1,
        "epochs": int(epochs),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "lr": float(lr),
    }
    digest = hashlib.sha256()
    digest.update(json.dumps([config, list(real_x.shape)], sort_keys=True).encode())
    digest.update(real_x.tobytes())
    digest.update(real_y.tobytes())
    folder = Path(cache_dir or default_cache_dir()) / "fd_classifier" / digest.hexdigest()[:16]
    model = build_classifier("cnn", **{k: config[k] for k in ("in_channels", "image_size", "num_classes")})
    if (folder / "model.safetensors").is_file() and (folder / "reference_stats.npz").is_file():
        model.load_state_dict(load_file(folder / "model.safetensors"))
        model = model.to(device).eval()
        mu, sigma = load_stats(folder / "reference_stats.npz")
        logger.info("fd_classifier: loaded the cached feature CNN from %s", folder)
        return model, mu, sigma, folder
    model, info = train_classifier(
        x=real_x,
        y=real_y,
        num_classes=config["num_classes"],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        progress=progress,
        desc="fd_classifier feature CNN",
    )
    mu, sigma = compute_stats(classifier_features(model, real_x, device=device))
    train_acc = accuracy(model, real_x, real_y, device=device)
    with atomic_directory(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_stats(tmp / "reference_stats.npz", mu, sigma, n=len(real_x))
        (tmp / "config.json").write_text(
            json.dumps(
                {**config, "n_train": len(real_x), "train_accuracy": train_acc, "seconds": info["seconds"]}, indent=2
            )
        )
    logger.info("fd_classifier: trained the feature CNN (train accuracy %.4f), cached in %s", train_acc, folder)
    return model, mu, sigma, folder


def fd_classifier(
    *,
    samples: np.ndarray,
    real_x: np.ndarray,
    real_y: np.ndarray,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 5,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
) -> float:
    """Fréchet distance between ``samples`` and the real training images in the downstream CNN's 128-d feature space.

    An offline stand-in for FID (lower is better; 0 for identical statistics). The feature CNN is trained on the real
    training data once and cached (see :func:`feature_classifier`). Not comparable with Inception FIDs.
    """
    real_x, real_y = validate_images(real_x, real_y, source="real training set")
    samples = np.asarray(samples)
    samples = samples[..., None] if samples.ndim == 3 else samples
    if samples.dtype != np.uint8 or samples.shape[1:] != real_x.shape[1:]:
        raise UserInputError(
            f"Samples are {samples.dtype} {samples.shape[1:]}; expected uint8 {real_x.shape[1:]} like the real images."
        )
    model, mu_ref, sigma_ref, _ = feature_classifier(
        real_x=real_x, real_y=real_y, cache_dir=cache_dir, epochs=epochs, seed=seed, device=device, progress=progress
    )
    mu, sigma = compute_stats(classifier_features(model, samples, device=device))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
