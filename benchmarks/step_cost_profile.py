"""``step_cost.py --profile SCENARIO``: one scenario in this process, and where its time goes: each Opacus grad
sampler (by layer type), clipping / noise / AdamW inside the optimizer step, and torch.profiler's top operators."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from step_cost_utils import SCENARIOS, Timer, build_run, logical_step, setup_process

from dp_diffusers.privacy import NoiseMultiplicityMixin

#: (class, method, label): the optimizer methods timed
TIMED_METHODS = [
    (DPOptimizer, "clip_and_accumulate", "optimizer.clip_and_accumulate"),
    (DPOptimizer, "add_noise", "optimizer.add_noise"),
    (DPOptimizer, "scale_grad", "optimizer.scale_grad"),
    (DPOptimizer, "pre_step", "optimizer.pre_step (clip + noise + scale + accountant)"),
    (NoiseMultiplicityMixin, "clip_and_accumulate", "optimizer.K-row mean + clip_and_accumulate"),
]


def _timed(fn, key: str, totals: dict, timer: Timer):
    def timed(*a, **kw):
        t = timer.now()
        try:
            return fn(*a, **kw)
        finally:
            totals[key] += timer.now() - t

    return timed


@contextmanager
def timed_opacus(totals: dict, timer: Timer):
    """Wraps Opacus' grad samplers, norm samplers and DPOptimizer's clip/noise methods with timers."""
    tables = [
        (GradSampleModule.GRAD_SAMPLERS, "grad_sampler"),
        (GradSampleModuleFastGradientClipping.NORM_SAMPLERS, "norm_sampler"),
    ]
    patched = [(table, cls, fn) for table, _ in tables for cls, fn in list(table.items())]
    originals = [(owner, meth, owner.__dict__[meth]) for owner, meth, _ in TIMED_METHODS]
    for table, label in tables:
        for cls, fn in list(table.items()):
            table[cls] = _timed(fn, f"{label}[{cls.__name__}]", totals, timer)
    for owner, meth, key in TIMED_METHODS:
        setattr(owner, meth, _timed(owner.__dict__[meth], key, totals, timer))
    try:
        yield
    finally:
        for table, cls, fn in patched:
            table[cls] = fn
        for owner, meth, orig in originals:
            setattr(owner, meth, orig)


def profile(args) -> None:
    name = args.profile
    device = setup_process(args)
    run = build_run(args, SCENARIOS[name], device)
    timer = Timer(device)
    totals = defaultdict(float)
    inner = getattr(run.optimizer, "original_optimizer", run.optimizer)
    inner.step = _timed(inner.step, "inner AdamW.step", totals, timer)
    for _ in range(max(1, args.warmup)):
        logical_step(run, timer)
    totals.clear()
    phases = defaultdict(list)
    with timed_opacus(totals, timer):
        t0 = timer.now()
        for _ in range(args.steps):
            logical_step(run, timer, phases)
        wall = timer.now() - t0
    print(
        f"{name}: {args.steps} steps of {args.batch_size} x {args.physical_batches} examples, "
        f"{wall / args.steps:.3f} s/step, torch threads {torch.get_num_threads()}"
    )
    for key, v in phases.items():
        print(f"  phase {key:<40}{sum(v) / args.steps:>9.4f} s/step")
    for key, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<46}{v / args.steps:>9.4f} s/step")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(min(args.steps, 3)):
            logical_step(run, timer)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
