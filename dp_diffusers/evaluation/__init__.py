"""Evaluation of class-conditional generators: samples, downstream accuracy, Fréchet distances and a report.

The protocol follows DPDM / DP-LDM / DPImageBench: draw class-balanced samples (:func:`generate_samples`), train a
classifier on them only and test it on real data (:func:`downstream_accuracy`), compare feature statistics with the
real training split (:func:`inception_fid` when Inception-v3 weights are on disk, :func:`fd_classifier` offline),
and write a one-page report (:func:`write_report`). ``examples/evaluate.py`` runs all of it from the command line.
"""

from .classifier import (
    CLASSIFIERS,
    DPIB_CLASSIFIERS,
    DPIBResNet,
    DPIBResNeXt,
    DPIBWideResNet,
    SmallCNN,
    SmallResNet,
    TrainingRecipe,
    build_classifier,
    training_recipe,
)
from .downstream import downstream_accuracy, downstream_accuracy_over, train_classifier
from .fid import (
    compute_stats,
    fd_classifier,
    frechet_distance,
    inception_extractor,
    inception_fid,
    load_stats,
    save_stats,
)
from .real_data import load_labelled_images
from .report import write_report
from .samples import class_grid, generate_samples, load_npz, save_npz

__all__ = [
    "CLASSIFIERS",
    "DPIB_CLASSIFIERS",
    "DPIBResNeXt",
    "DPIBResNet",
    "DPIBWideResNet",
    "SmallCNN",
    "SmallResNet",
    "TrainingRecipe",
    "build_classifier",
    "class_grid",
    "compute_stats",
    "downstream_accuracy",
    "downstream_accuracy_over",
    "fd_classifier",
    "frechet_distance",
    "generate_samples",
    "inception_extractor",
    "inception_fid",
    "load_labelled_images",
    "load_npz",
    "load_stats",
    "save_npz",
    "save_stats",
    "train_classifier",
    "training_recipe",
    "write_report",
]
