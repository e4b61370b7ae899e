"""Collects benchmarks/audit/<name>/audit.json (written by run.sh) into docs/audit.json, in run.sh's order."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["wb-nodp", "wb-eps10", "wb-eps1", "bb-nodp", "bb-eps10", "bb-eps1"]
KEEP = (
    "steps",
    "noise_multiplier",
    "sample_rate",
    "max_grad_norm",
    "canary_norm",
    "clipped_canary_norm",
    "score_in_mean",
    "score_out_mean",
    "score_out_std",
    "expected_in_mean",
    "residual_std",
    "expected_noise_std",
    "joins_per_included_canary_mean",
    "ideal_reference",
    "private_examples",
    "canary",
    "score",
    "auc_per_timestep",
    "train_seconds",
    "grad_sample_mode",
    "optimizer",
    "dataset_size",
    "trained_coordinates",
)


def main() -> None:
    rows = []
    for name in ORDER:
        path = HERE / name / "audit.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        details = r.pop("details")
        r["run"] = name
        r["details"] = {k: details[k] for k in KEEP if k in details}
        rows.append(r)
    out = HERE.parents[1] / "docs" / "audit.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        eps = "-" if r["epsilon_accounted"] is None else f"{r['epsilon_accounted']:.3f}"
        print(
            f"| {r['name']} | {r['setting']} | {r['m']} | {eps} | {r['epsilon_one_run']:.3f} | "
            f"{r['epsilon_one_run_fdp']:.3f} | {r['epsilon_lower_bound']:.3f} | {r['auc']:.3f} | "
            f"{r['wall_seconds'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
