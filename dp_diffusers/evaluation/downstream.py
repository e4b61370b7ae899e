"""Downstream accuracy: train a classifier on synthetic images only, select it on held-out synthetic images, test on
real ones.

This is the utility metric of DPDM, DP-LDM and DPImageBench ("train on synthetic, test on real"). Model selection
(the best epoch) uses a held-out split of the *synthetic* set (5,000 of 60,000 by default, as in DPImageBench's
55,000 / 5,000); the real test set is touched once per seed, by the selected model.

Each classifier trains with its :class:`~dp_diffusers.evaluation.classifier.TrainingRecipe` (optimiser, learning
rate, schedule, weight averaging, epochs, batch size) unless told otherwise: constant-rate Adam for ``"cnn"`` and
``"resnet"``, DPImageBench's recipe for ``"dpib_resnet"``, ``"dpib_wrn"`` and ``"dpib_resnext"``, whose mean accuracy
:func:`downstream_accuracy_over` reports as DPImageBench does.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import UserInputError
from .classifier import (
    ADAM_RECIPE,
    DPIB_CLASSIFIERS,
    TrainingRecipe,
    build_classifier,
    to_model_input,
    training_recipe,
)
from .samples import validate_images

logger = logging.getLogger(__name__)

#: Defaults of the CNN (its recipe), measured on 2 CPU cores: one 55,000-image epoch of the CNN takes ~11-15 s.
DEFAULT_EPOCHS = ADAM_RECIPE.epochs
DEFAULT_BATCH_SIZE = ADAM_RECIPE.batch_size
DEFAULT_LR = ADAM_RECIPE.lr
DEFAULT_VAL_FRACTION = 1 / 12  # 5,000 of 60,000


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, *, batch_size: int = 1000, device="cpu") -> np.ndarray:
    """Class predictions of ``model`` (in eval mode) for ``uint8`` images ``[N, H, W, C]``."""
    x = torch.as_tensor(x)
    was_training = model.training
    model.eval()
    preds = [
        model(to_model_input(x[i : i + batch_size]).to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(preds).numpy()


def accuracy(model: nn.Module, x, y, *, batch_size: int = 1000, device="cpu") -> float:
    """Fraction of ``y`` that ``model`` predicts correctly."""
    return float((predict(model, x, batch_size=batch_size, device=device) == np.asarray(y)).mean())


def classifier_ema(params: Sequence[nn.Parameter], decay: float) -> EMAModel:
    """diffusers' ``EMAModel`` over ``params``, counting updates as DPImageBench's ``evaluation/ema.py``: update ``t``
    (1-based) uses ``d = min(decay, (1 + t) / (10 + t))``, so the first moves the average 9/11 of the way.
    ``EMAModel`` computes ``(1 + s) / (10 + s)`` with ``s = t - update_after_step - 1``; ``update_after_step=-1``
    makes ``s = t``. BatchNorm running statistics are not averaged (they are buffers, not parameters)."""
    if not 0.0 <= float(decay) <= 1.0:
        raise UserInputError(f"EMA decay must be in [0, 1], got {decay}.")
    return EMAModel(list(params), decay=float(decay), update_after_step=-1)


@contextmanager
def _averaged(ema: EMAModel | None, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block ``params`` hold the averaged values (if any); their own come back afterwards."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _with_recipe(classifier: str, epochs, batch_size, lr) -> tuple[TrainingRecipe, int, int, float]:
    """``classifier``'s recipe, and ``epochs``, ``batch_size``, ``lr`` with the recipe's values for ``None``."""
    recipe = training_recipe(classifier)
    return (
        recipe,
        recipe.epochs if epochs is None else epochs,
        recipe.batch_size if batch_size is None else batch_size,
        recipe.lr if lr is None else lr,
    )


def train_classifier(
    *,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    classifier: str = "cnn",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
) -> tuple[nn.Module, dict]:
    """Trains ``classifier`` from scratch on ``uint8`` images ``x`` ``[N, H, W, C]`` with Adam and cross-entropy.

    The optimiser settings are the classifier's :func:`~dp_diffusers.evaluation.classifier.training_recipe`:
    ``epochs``, ``batch_size`` and ``lr`` default to it (``None``), and its weight decay, per-epoch ``StepLR``
    schedule and weight averaging (EMA) always apply. With an EMA, the averaged weights are the ones validated and
    returned, as in DPImageBench.

    With ``val_x``/``val_y`` the returned model is the epoch with the best validation accuracy (the earliest on
    ties); otherwise it is the last epoch. Initialisation, shuffling and dropout are seeded from ``seed``.

    Returns:
        ``(model in eval mode, info)`` where ``info`` holds ``best_epoch`` (1-based), ``val_accuracy`` (of the
        selected epoch, or ``None``), ``val_history`` and ``seconds``.
    """
    recipe, epochs, batch_size, lr = _with_recipe(classifier, epochs, batch_size, lr)
    if int(epochs) < 1:
        raise UserInputError(f"epochs must be >= 1, got {epochs}.")
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}.")
    start = time.perf_counter()
    torch.manual_seed(int(seed))
    shuffle = torch.Generator().manual_seed(int(seed))
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    model = build_classifier(classifier, in_channels=x.shape[-1], image_size=x.shape[1], num_classes=num_classes)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr), weight_decay=recipe.weight_decay)
    scheduler = None
    if recipe.lr_step_epochs is not None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step_epochs, gamma=recipe.lr_gamma)
    trained = [p for p in model.parameters() if p.requires_grad]
    ema = None if recipe.ema_decay is None else classifier_ema(trained, recipe.ema_decay)
    best_state, best_acc, best_epoch, history = None, -1.0, int(epochs), []
    bar = tqdm(range(1, int(epochs) + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        for idx in torch.randperm(len(xt), generator=shuffle).split(int(batch_size)):
            inputs, targets = to_model_input(xt[idx]).to(device), yt[idx].to(device)
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.step(trained)
        if scheduler is not None:
            scheduler.step()
        if val_x is not None:
            with _averaged(ema, trained):
                acc = accuracy(model, val_x, val_y, batch_size=recipe.eval_batch_size, device=device)
                history.append(acc)
                bar.set_postfix(val_acc=f"{acc:.4f}")
                if acc > best_acc:
                    best_acc, best_epoch = acc, epoch
                    best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        ema.copy_to(trained)
    model.eval()
    info = {
        "best_epoch": best_epoch,
        "val_accuracy": best_acc if val_x is not None else None,
        "val_history": history,
        "seconds": time.perf_counter() - start,
    }
    return model, info


def split_train_val(n: int, *, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint ``(train_idx, val_idx)`` of ``range(n)``; ``round(n * val_fraction)`` (>= 1) for validation."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UserInputError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * float(val_fraction))))
    if n - n_val < 1:
        raise UserInputError(f"{n} training images are too few to hold out {n_val} for validation.")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def downstream_accuracy(
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    classifier: str = "cnn",
    num_classes: int | None = None,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Trains a fresh classifier per seed on the synthetic set only and reports its accuracy on the real test set.

    ``train_x``/``train_y`` (synthetic) are split once (``split_seed``) into a training part and a validation part
    (``val_fraction``; 5,000 of 60,000 by default). Each seed trains ``classifier`` for ``epochs`` epochs on the
    training part; the epoch with the best validation accuracy is selected; only that model sees the test set.

    Args:
        train_x, train_y: synthetic ``uint8`` images ``[N, H, W, C]`` (or ``[N, H, W]``) and integer labels.
        test_x, test_y: real test images and labels, same image shape.
        seeds: one training run per seed (initialisation, shuffling, dropout); the split is shared.
        epochs, batch_size, lr: Adam training settings; ``None``: the classifier's recipe (the CNN's 10 / 128 / 1e-3
            take ~2 minutes per seed for 55,000 MNIST images on 2 CPU cores; DPImageBench's are 50 / 256 / 0.01).
        val_fraction: share of the synthetic set held out for model selection (0 disables selection: last epoch).
        classifier: ``"cnn"`` (DPDM's MNIST CNN), ``"resnet"`` (small ResNet, for 32x32 RGB) or one of
            DPImageBench's ``"dpib_resnet"``, ``"dpib_wrn"``, ``"dpib_resnext"``.
        num_classes: defaults to ``max(label) + 1`` over both sets.
        split_seed: seed of the train/validation split.
        device: torch device for training.
        progress: show tqdm progress bars.

    Returns:
        A dict with ``accuracy_mean`` and ``accuracy_std`` (percent; std over seeds with ``ddof=0``, as DPImageBench
        reports), ``accuracies`` and ``val_accuracies`` (percent, per seed), ``best_epochs``, ``n_train``,
        ``n_val``, ``n_test``, ``num_classes``, ``classifier``, ``seeds``, ``epochs``, ``batch_size``, ``lr``,
        ``val_fraction`` and ``seconds`` (total wall time).
    """
    train_x, train_y = validate_images(train_x, train_y, source="synthetic training set")
    test_x, test_y = validate_images(test_x, test_y, source="real test set")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserInputError(
            f"Synthetic images have shape {train_x.shape[1:]} (H, W, C) but real test images {test_x.shape[1:]}; "
            "they must match."
        )
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserInputError("seeds must not be empty.")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    elif max(train_y.max(), test_y.max()) >= num_classes:
        raise UserInputError(f"Labels reach {int(max(train_y.max(), test_y.max()))} but num_classes is {num_classes}.")
    recipe, epochs, batch_size, lr = _with_recipe(classifier, epochs, batch_size, lr)
    tr, va = split_train_val(len(train_x), val_fraction=val_fraction, seed=split_seed)
    x_tr, y_tr = train_x[tr], train_y[tr]
    x_va, y_va = (train_x[va], train_y[va]) if len(va) else (None, None)

    start = time.perf_counter()
    accs, val_accs, best_epochs = [], [], []
    for seed in seeds:
        model, info = train_classifier(
            x=x_tr,
            y=y_tr,
            num_classes=num_classes,
            classifier=classifier,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            val_x=x_va,
            val_y=y_va,
            device=device,
            progress=progress,
            desc=f"{classifier} seed {seed}",
        )
        acc = 100.0 * accuracy(model, test_x, test_y, batch_size=recipe.eval_batch_size, device=device)
        logger.info("seed %d: best epoch %d, test accuracy %.2f%%", seed, info["best_epoch"], acc)
        accs.append(acc)
        val_accs.append(None if info["val_accuracy"] is None else 100.0 * info["val_accuracy"])
        best_epochs.append(info["best_epoch"])
    return {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "accuracies": accs,
        "val_accuracies": val_accs,
        "best_epochs": best_epochs,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(test_x),
        "num_classes": num_classes,
        "classifier": classifier,
        "seeds": seeds,
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "val_fraction": float(val_fraction),
        "seconds": time.perf_counter() - start,
    }


def downstream_accuracy_over(*, classifiers: Sequence[str] = DPIB_CLASSIFIERS, **kwargs) -> dict:
    """:func:`downstream_accuracy` for each of ``classifiers`` (same split, seeds and settings), and the mean and std
    of their accuracies: DPImageBench's headline number with its default, the three ``dpib_*`` classifiers.

    Args:
        classifiers: names from :data:`~dp_diffusers.evaluation.classifier.CLASSIFIERS`.
        kwargs: the other arguments of :func:`downstream_accuracy`.

    Returns:
        A dict with ``accuracy_mean`` and ``accuracy_std`` (percent; mean and std with ``ddof=0`` over the
        classifiers of each one's mean accuracy over seeds, as DPImageBench's ``acc_mean`` / ``acc_std``),
        ``classifiers``, ``accuracy_by_classifier`` and ``accuracy_std_by_classifier`` (percent, std over seeds),
        ``downstream_by_classifier`` (each :func:`downstream_accuracy` result), the settings the runs share
        (``seeds``, ``n_train``, ``n_val``, ``n_test``, ``num_classes``, ``val_fraction``, and ``epochs``,
        ``batch_size`` and ``lr`` where equal across runs) and ``seconds``.
    """
    classifiers = list(classifiers)
    if not classifiers:
        raise UserInputError("classifiers must not be empty.")
    start = time.perf_counter()
    runs = {name: downstream_accuracy(classifier=name, **kwargs) for name in classifiers}
    means = {name: r["accuracy_mean"] for name, r in runs.items()}
    first = runs[classifiers[0]]
    result = {
        "accuracy_mean": float(np.mean(list(means.values()))),
        "accuracy_std": float(np.std(list(means.values()))),
        "classifiers": classifiers,
        "accuracy_by_classifier": means,
        "accuracy_std_by_classifier": {name: r["accuracy_std"] for name, r in runs.items()},
        "downstream_by_classifier": runs,
    }
    for key in ("seeds", "n_train", "n_val", "n_test", "num_classes", "val_fraction", "epochs", "batch_size", "lr"):
        if all(r[key] == first[key] for r in runs.values()):
            result[key] = first[key]
    result["seconds"] = time.perf_counter() - start
    return result
