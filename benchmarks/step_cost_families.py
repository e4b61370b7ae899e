"""``step_cost.py --family text|dit|unconditional|all``: non-private vs DP attention-only on each model family's
tiny random pipeline (``dp_diffusers/models/tiny.py``), saved and loaded back with ``load_family`` as
``train_dp_ldm.py`` loads a base model; one row per family."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from step_cost_utils import Column, environment, finish_environment, fmt, measure, print_table, ratio, trainable_text

from dp_diffusers import DPLDMPipeline
from dp_diffusers.models import tiny
from dp_diffusers.models.configs import build_class_conditional_ldm


@dataclass(frozen=True)
class TinyFamily:
    pipeline: str  # what it is
    builder: str  # where it is built, for the record
    build: Callable  # seed -> the pipeline


def _build_ours(seed: int) -> DPLDMPipeline:
    torch.manual_seed(seed)
    return DPLDMPipeline(**build_class_conditional_ldm(tiny.TINY_RGB))


FAMILIES = {
    "ours": TinyFamily(
        "DPLDMPipeline (class-conditional UNet)", "configs:build_class_conditional_ldm(TINY_RGB)", _build_ours
    ),
    "text": TinyFamily(
        "StableDiffusionPipeline (text-conditional UNet + CLIP)",
        "tiny:build_tiny_stable_diffusion",
        tiny.build_tiny_stable_diffusion,
    ),
    "dit": TinyFamily("DiTPipeline (class-conditional transformer)", "tiny:build_tiny_dit", tiny.build_tiny_dit),
    "unconditional": TinyFamily("LDMPipeline (unconditional UNet, VQ)", "tiny:build_tiny_ldm", tiny.build_tiny_ldm),
}
NP, DP = "nonprivate_attention_blocks", "dp_attention_blocks_hooks"
SCENARIOS = [NP, DP]


def run(args) -> dict:
    """For each family, its baseline and the two scenarios measured as ``--family ours`` measures its scenarios (the
    two interleaved), one family after the other."""

    names = [n for n in FAMILIES if n != "ours"] + ["ours"] if args.family == "all" else [args.family]
    env = environment(args)
    env["model"] = "tiny random pipelines of dp_diffusers/models/tiny.py (saved, reloaded with load_family)"
    env["configs"] = SCENARIOS
    families = {}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        for name in names:
            family = FAMILIES[name]
            sub = copy.copy(args)
            sub.model = os.path.join(tmp, name)
            family.build(args.seed).save_pretrained(sub.model)
            baseline, results = measure(sub, SCENARIOS, f"family {name}: {family.pipeline} ...")
            families[name] = {
                "pipeline": family.pipeline,
                "builder": family.builder,
                "baseline": baseline,
                "results": results,
                "ratios": {
                    "time dp / nonprivate": ratio(results, DP, NP),
                    "time dp / nonprivate (fastest steps)": ratio(results, DP, NP, key="seconds_per_example_min"),
                    "memory dp / nonprivate": ratio(results, DP, NP, key="peak_memory_delta_mib"),
                },
            }
    finish_environment(env, [r for f in families.values() for r in f["results"].values()])
    return {"environment": env, "families": families}


def _both(title: str, width: int, text: Callable[[dict], str]) -> list[Column]:
    """The non-private and the DP scenario's column of one figure."""
    return [
        Column(f"{who} {title}", width, lambda f, c=c: text(f["results"][c])) for who, c in (("np", NP), ("dp", DP))
    ]


def _ratio(title: str, width: int, key: str) -> Column:
    return Column(title, width, lambda f: fmt(f["ratios"][key], ".2f") + "x")


def print_summary(summary: dict) -> None:
    env = summary["environment"]
    heading = (
        f"TINY random pipelines (dp_diffusers/models/tiny.py): ratios, not absolute times, are the point.  batch "
        f"{env['batch_size']} examples  {env['warmup']} warm-up + {env['steps']} timed steps  load avg "
        f"{fmt(env['load_average_1m_at_start'], '.2f')} -> {fmt(env['load_average_1m_at_end'], '.2f')}"
    )
    columns = [
        Column("trainable", 20, lambda f: trainable_text(f["results"][DP])),
        *_both("s/step", 11, lambda r: f"{r['step_seconds_median']:.3f}"),
        *_both("ms/ex", 10, lambda r: f"{1e3 * r['seconds_per_example']:.2f}"),
        _ratio("dp/np", 7, "time dp / nonprivate"),
        _ratio("(min)", 7, "time dp / nonprivate (fastest steps)"),
        *_both(
            "mem MiB" if env["device"] == "cpu" else "alloc MiB",
            12,
            lambda r: fmt(r.get("peak_memory_delta_mib"), ".0f"),
        ),
        _ratio("mem dp/np", 11, "memory dp / nonprivate"),
    ]
    rows = {}
    for name, f in summary["families"].items():
        errors = [f"{c}: {r['error']}" for c, r in f["results"].items() if "error" in r]
        rows[name] = "; ".join(errors) if errors else f
    print_table(env, [heading], ("family", 14), columns, rows)
    print(
        f"(np = {NP}, dp = {DP}: attention blocks + embedder, same batch; s/step = median"
        " step; dp/np = ratio of median (min: of fastest) steps; mem = peak RSS minus that of the family's baseline"
        " process: "
        + ", ".join(f"{n} {fmt(f['baseline'].get('peak_rss_mib'), '.0f')}" for n, f in summary["families"].items())
        + " MiB)"
    )
    for name, f in summary["families"].items():
        dp = f["results"].get(DP, {})
        if "trained_modules" in dp:
            print(
                f"  {name}: {f['pipeline']}; {dp['trained_modules']} trained modules, "
                f"{dp['trainable_tensors']} tensors, of {dp['total_parameters']:,} denoiser + embedder parameters"
            )
