"""A one-page markdown report of an evaluation: sample grid, metrics table, privacy guarantee."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..atomic import atomic_write_text

_PRIVACY_FIRST = (
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "batch_size",
    "logical_batch_size",
    "steps",
    "epochs",
    "dataset_size",
)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metric_rows(m: dict) -> list[tuple[str, str]]:
    rows = []
    by_classifier = m.get("downstream_by_classifier") or {}
    if "accuracy_mean" in m and by_classifier:  # several classifiers (downstream_accuracy_over)
        rows.append(
            (
                f"Downstream accuracy ({m.get('classifier', '?')}: mean ± std over {', '.join(by_classifier)}; "
                "trained on synthetic, tested on real)",
                f"**{m['accuracy_mean']:.2f} ± {m.get('accuracy_std', 0.0):.2f} %**",
            )
        )
        for name, run in by_classifier.items():
            per_seed = ", ".join(f"{a:.2f}" for a in run.get("accuracies", []))
            rows.append(
                (
                    f"Downstream accuracy ({name})",
                    f"{run['accuracy_mean']:.2f} ± {run.get('accuracy_std', 0.0):.2f} % (seeds {run.get('seeds')}: "
                    f"{per_seed}; best epochs {run.get('best_epochs')})",
                )
            )
    elif "accuracy_mean" in m:
        seeds = m.get("seeds")
        per_seed = ", ".join(f"{a:.2f}" for a in m.get("accuracies", []))
        rows.append(
            (
                f"Downstream accuracy ({m.get('classifier', '?')}, trained on synthetic, tested on real)",
                f"**{m['accuracy_mean']:.2f} ± {m.get('accuracy_std', 0.0):.2f} %** (seeds {seeds}: {per_seed})",
            )
        )
    if "accuracy_mean" in m:
        rows.append(
            (
                "Images: synthetic train / synthetic val (model selection) / real test",
                f"{m.get('n_train', '?')} / {m.get('n_val', '?')} / {m.get('n_test', '?')}",
            )
        )
        if m.get("epochs") is not None:
            text = f"epochs: {m['epochs']}"
            if "best_epochs" in m:
                text += f"; best epoch per seed: {m['best_epochs']}"
            rows.append(("Classifier training", text))
    if "fid_inception" in m:
        if m["fid_inception"] is not None:
            rows.append(("FID (Inception-v3, 2048-d, vs real train)", f"**{m['fid_inception']:.2f}**"))
        else:
            reason = m.get("fid_inception_unavailable_reason") or "not computed"
            rows.append(("FID (Inception-v3)", f"not computed: {_fmt(reason)}"))
    if m.get("fd_classifier") is not None:
        rows.append(
            (
                "fd_classifier (Fréchet distance in CNN features, vs real train; NOT an FID)",
                f"{m['fd_classifier']:.4f}",
            )
        )
    elif m.get("fd_classifier_skipped_reason"):
        rows.append(("fd_classifier", f"not computed: {_fmt(m['fd_classifier_skipped_reason'])}"))
    shown = {
        "accuracy_mean",
        "accuracy_std",
        "accuracies",
        "seeds",
        "classifier",
        "n_train",
        "n_val",
        "n_test",
        "epochs",
        "best_epochs",
        "fid_inception",
        "fid_inception_unavailable_reason",
        "fd_classifier",
        "fd_classifier_skipped_reason",
        "samples",
        "num_samples",
    }
    for k, v in m.items():
        if k not in shown and not isinstance(v, dict):
            if isinstance(v, list) and all(isinstance(a, float) for a in v):
                v = [round(a, 2) for a in v]
            rows.append((f"`{k}`", _fmt(v)))
    return rows


def write_report(*, output_dir: str | os.PathLike, metrics: dict, privacy: dict | None, grid_path: str | None) -> str:
    """Writes ``output_dir/report.md``: the sample grid (copied beside the report), metrics and privacy numbers.

    Args:
        output_dir: folder of the report (created if missing).
        metrics: the dict that ``examples/evaluate.py`` writes to ``metrics.json`` (keys such as ``accuracy_mean``,
            ``fid_inception``, ``fd_classifier``); unknown scalar keys are listed too.
        privacy: the contents of a training run's ``privacy.json`` (epsilon, delta, ...), or ``None``.
        grid_path: a PNG of samples (one row per class), or ``None``.

    Returns:
        The path of ``report.md``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# DP-LDM evaluation report", ""]
    source = metrics.get("samples")
    if source:
        lines += [
            f"Samples: `{source}`" + (f" ({metrics['num_samples']} images)" if "num_samples" in metrics else ""),
            "",
        ]
    if grid_path and Path(grid_path).is_file():
        target = out / Path(grid_path).name
        if Path(grid_path).resolve() != target.resolve():
            shutil.copyfile(grid_path, target)
        lines += ["## Samples (one row per class)", "", f"![samples, one row per class]({target.name})", ""]

    lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in _metric_rows(metrics)]
    lines += [
        "",
        "Accuracy follows the DPDM / DPImageBench protocol: a classifier is trained from scratch on the synthetic "
        "images only, the best epoch is chosen on held-out *synthetic* images, and only that model is scored on the "
        "real test set (mean ± std over seeds).",
        "",
    ]

    lines += ["## Privacy", ""]
    if privacy:
        flat = _flatten(privacy)
        keys = [k for k in _PRIVACY_FIRST if k in flat] + [k for k in flat if k not in _PRIVACY_FIRST]
        lines += ["| quantity | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(flat[k])} |" for k in keys]
        if "epsilon" in flat and "delta" in flat:
            lines += [
                "",
                f"The fine-tuning is ({_fmt(flat['epsilon'])}, {_fmt(flat['delta'])})-differentially private.",
            ]
    else:
        lines += ["No privacy accounting was given (pass `--privacy_json` with the training run's privacy.json)."]
    lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return str(path)
