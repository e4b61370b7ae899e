#!/usr/bin/env python
"""Cost of one training step of DP-LDM: seconds per example and peak memory, private vs non-private.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --steps 10            # CPU, default model (random init)
    python benchmarks/step_cost.py --device cuda --batch_size 256 --json   # GPU
    python benchmarks/step_cost.py --model dp_diffusers/assets/public-printed-digits
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --model_config paper_cifar10 --batch_size 8 --steps 3

Every configuration trains the same model (``build_class_conditional_ldm(LDMConfig())`` seeded alike, the
``--model_config`` named in ``dp_diffusers.models.configs`` (``paper_cifar10``: the paper's 90M-parameter CIFAR-10
denoiser with 16 attention blocks), or the ``--model`` pipeline folder) on the same physical batch (``--batch_size``
examples of synthetic latents) through the same loop as ``train_dp_ldm.py``: ``DPEngine.physical_batches`` /
``backward`` / ``step`` with the ``ClassConditionalLoss`` module. Each logical batch is exactly one physical batch
of exactly ``--batch_size`` examples: the engine is built with ``dataset_size == expected_batch_size`` (Poisson rate
q = 1 includes every example), a fixed noise multiplier (1.0), no target epsilon and an unreachable step plan, so it
never stops.

Configurations (each in a fresh subprocess, so that its peak memory is its own):

* ``nonprivate_attention``: ``disable_dp`` (plain AdamW, no clipping or noise) on the attention blocks + embedder;
* ``dp_attention_hooks``: DP-SGD, attention blocks + embedder, Opacus hooks (per-sample gradients); with
  ``--attention_layers A-B`` only those attention blocks (+ embedder) in every attention-only configuration;
* ``dp_attention_ghost``: the same with ghost clipping (``grad_sample_mode="ghost"``);
* ``dp_attention_bookkeeping``: the same with book-keeping clipping (``grad_sample_mode="bookkeeping"``, the default
  of ``train_dp_ldm.py``: linear weights clipped from per-example norms, no per-sample weight gradients);
* ``dp_full_unet_hooks``: DP-SGD with every UNet parameter + the embedder trainable, hooks;
* ``dp_attention_hooks_k4``: DP attention-only, hooks, noise multiplicity K=4 (``--batch_size`` examples = 4x rows).

Memory: on CPU, the peak RSS (``VmHWM``) of each configuration's process minus that of a baseline process that only
builds the model, the loss module and the data (imports included in both); on CUDA,
``torch.cuda.max_memory_allocated`` during the steps minus the memory allocated once the model and data are on the
device (measured inside each process).

Time: each process builds its configuration and runs ``--warmup`` logical steps; then the parent runs ``--steps``
rounds, each asking every configuration for one timed logical step in turn (order rotated each round), so that all
configurations see the same background load (only one runs at a time). The median step is reported (min too; mean
and every step in --json), split into data (Poisson loader + copy), forward, backward (per-sample gradients or
norms) and optimizer step (clipping, noise, AdamW). On CUDA every boundary is synchronised.

``--family text|dit|unconditional|all`` measures the other model families instead (default ``ours``: the
class-conditional LDM above, unchanged). For each family the TINY randomly initialised pipeline of
``dp_diffusers/models/tiny.py`` (a few hundred thousand parameters, 32x32 RGB, 8x8 latents) is saved to a temporary
folder and loaded back with ``dp_diffusers.families.load_family``, as ``train_dp_ldm.py`` loads a base model; the
trainable parameters are chosen as there (``select_trainable(family.denoiser, embedder=family.embedder,
block_classes=family.attention_block_classes)``) and the loss is the family's own ``loss_module``. The inputs are
synthetic encoded examples of the right shapes (random latents; random labels for the class-conditional families,
template prompts of random labels tokenised by the family's own tokenizer for the text-conditional one). Two
configurations per family, on the same physical batch: ``nonprivate_attention`` and ``dp_attention_hooks``, each
with its own baseline process for the memory figure. ``all`` also measures ``ours`` as a tiny RGB pipeline
(``build_class_conditional_ldm(TINY_RGB)``) so that the four families share one table. These models are tiny and
random (DiT-XL/2 or Stable Diffusion would need a GPU): the DP / non-private ratios and the trainable fractions are
the point, not the absolute times.

``--profile CONFIG`` runs one configuration in-process instead and prints where its time goes: time per Opacus grad
sampler (by layer type), clipping / noise / AdamW inside the optimizer step, and torch.profiler's top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

CONFIGS = {
    # name: (description, private, scope, grad_sample_mode, noise_multiplicity)
    "nonprivate_attention": ("non-private, attention + embedder (AdamW)", False, "attention", "hooks", 1),
    "dp_attention_hooks": ("DP, attention + embedder, hooks", True, "attention", "hooks", 1),
    "dp_attention_ghost": ("DP, attention + embedder, ghost clipping", True, "attention", "ghost", 1),
    "dp_attention_bookkeeping": ("DP, attention + embedder, book-keeping", True, "attention", "bookkeeping", 1),
    "dp_full_unet_hooks": ("DP, full UNet + embedder, hooks", True, "full", "hooks", 1),
    "dp_attention_hooks_k4": ("DP, attention + embedder, hooks, K=4", True, "attention", "hooks", 4),
    "dp_attention_bookkeeping_k4": ("DP, attention + embedder, bookkeeping, K=4", True, "attention", "bookkeeping", 4),
    # Optional (not in the default --configs): only the q/k/v/out projections (--trainable_scope
    # attention_projections) + embedder.
    "nonprivate_projections": ("non-private, q/k/v/out projections + embedder", False, "projections", "hooks", 1),
    "dp_projections_hooks": ("DP, q/k/v/out projections + embedder, hooks", True, "projections", "hooks", 1),
}
DEFAULT_CONFIGS = [
    "nonprivate_attention",
    "dp_attention_hooks",
    "dp_attention_ghost",
    "dp_attention_bookkeeping",
    "dp_full_unet_hooks",
    "dp_attention_hooks_k4",
]
FAMILY_CONFIGS = ["nonprivate_attention", "dp_attention_hooks"]
#: --model_config name -> LDMConfig constant in dp_diffusers.models.configs
MODEL_CONFIGS = {"default": "DEFAULT", "tiny": "TINY", "paper_cifar10": "PAPER_CIFAR10"}

#: --family name -> (tiny pipeline builder in dp_diffusers.models, what it is)
FAMILIES = {
    "ours": ("configs:build_class_conditional_ldm(TINY_RGB)", "DPLDMPipeline (class-conditional UNet)"),
    "text": ("tiny:build_tiny_stable_diffusion", "StableDiffusionPipeline (text-conditional UNet + CLIP)"),
    "dit": ("tiny:build_tiny_dit", "DiTPipeline (class-conditional transformer)"),
    "unconditional": ("tiny:build_tiny_ldm", "LDMPipeline (unconditional UNet, VQ)"),
}
DIT_PRIVATE_CLASSES = 10
BASELINE = "baseline"
RESULT_MARK = "@@STEP_COST_RESULT@@ "
MAX_STEPS = 10**9  # the engine's step plan: never reached
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1e-3  # train_dp_ldm.py's default (every per-example gradient is clipped)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="A DPLDMPipeline folder (default: LDMConfig() randomly initialised).")
    p.add_argument(
        "--model_config",
        default="default",
        choices=list(MODEL_CONFIGS),
        help="Without --model, the randomly initialised model: default (LDMConfig(), the shipped model's layout), "
        "tiny (smoke tests), paper_cifar10 (the paper's CIFAR-10 denoiser: 90M parameters, 16 attention blocks).",
    )
    p.add_argument("--tiny", action="store_true", help="Same as --model_config tiny.")
    p.add_argument(
        "--attention_layers",
        default=None,
        help="As train_dp_ldm.py's flag: train only these attention blocks (e.g. 9-16) in the attention-only "
        "configurations (default: all, as train_dp_ldm.py).",
    )
    p.add_argument(
        "--freeze_embedder",
        action="store_true",
        help="As train_dp_ldm.py's flag: do not train the class embedder in the attention-only configurations.",
    )
    p.add_argument("--batch_size", type=int, default=64, help="Examples per physical batch.")
    p.add_argument(
        "--physical_batches",
        type=int,
        default=1,
        help="Physical batches per logical step (logical batch = batch_size x this), as with train_dp_ldm.py's "
        "--train_batch_size > --max_physical_batch_size: the per-step work (noise, AdamW) is shared by more examples.",
    )
    p.add_argument("--steps", type=int, default=10, help="Timed logical steps per configuration.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed logical steps first.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N).")
    p.add_argument(
        "--release_cpu_memory",
        action="store_true",
        help="As train_dp_ldm.py's flag: do not make glibc keep freed memory (dp_diffusers.runtime) on CPU.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        choices=list(CONFIGS),
        help="Configurations to measure (nonprivate_projections and dp_projections_hooks are optional extras).",
    )
    p.add_argument(
        "--family",
        default="ours",
        choices=[*FAMILIES, "all"],
        help="ours: the class-conditional LDM (--model / --tiny / LDMConfig()), every --configs. text, dit, "
        "unconditional: that family's tiny random pipeline (dp_diffusers/models/tiny.py), non-private vs DP "
        "attention-only. all: the three plus a tiny RGB 'ours', one table.",
    )
    p.add_argument("--json", action="store_true", help="Print every figure as one JSON object (no table).")
    p.add_argument("--profile", default=None, choices=list(CONFIGS), help="Profile one configuration in-process.")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_family", default=None, choices=list(FAMILIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model_config = "tiny"
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.physical_batches < 1:
        p.error("--batch_size, --physical_batches and --steps must be >= 1, --warmup >= 0")
    ours_only = args.model or args.model_config != "default" or args.profile or args.attention_layers
    ours_only = ours_only or args.freeze_embedder
    if args.family != "ours" and ours_only:
        p.error("--model, --model_config, --attention_layers and --profile apply to --family ours only")
    return args


# ---------------------------------------------------------------------------------------------------- the model


def load_family(args):
    import torch

    if args._family:
        return load_family_tiny(args)

    from dp_diffusers import DPLDMPipeline
    from dp_diffusers.families import ClassConditionalLDM
    from dp_diffusers.models import configs

    torch.manual_seed(args.seed)
    if args.model:
        return ClassConditionalLDM.from_pretrained(args.model)
    config = getattr(configs, MODEL_CONFIGS[args.model_config])
    return ClassConditionalLDM(DPLDMPipeline(**configs.build_class_conditional_ldm(config)))


def synthetic_latents(family, n: int, seed: int):
    """``n`` encoded examples shaped like the model's latents (what ``ClassConditionalLDM.encode`` returns)."""
    import torch

    vae = family.vae.config
    size = family.resolution // 2 ** (len(vae.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, vae.latent_channels, size, size, generator=g)
    std = 0.1 * torch.rand(n, vae.latent_channels, size, size, generator=g)
    labels = torch.randint(0, family.embedder.config.num_classes, (n,), generator=g)
    return torch.utils.data.TensorDataset(mean, std, labels)


def build_tiny_pipeline(name: str, seed: int):
    """The tiny random pipeline of family ``name`` (see ``FAMILIES``)."""
    from dp_diffusers.models import tiny

    if name == "ours":
        import torch

        from dp_diffusers import DPLDMPipeline
        from dp_diffusers.models.configs import build_class_conditional_ldm

        torch.manual_seed(seed)
        return DPLDMPipeline(**build_class_conditional_ldm(tiny.TINY_RGB))
    return getattr(tiny, FAMILIES[name][0].split(":")[1])(seed=seed)


def load_family_tiny(args):
    """``--family`` mode: the saved tiny pipeline (``--model``), loaded as train_dp_ldm.py loads a base model."""
    import torch

    from dp_diffusers.families import load_family as load

    torch.manual_seed(args.seed)
    family = load(args.model)
    if args._family == "dit":  # train_dp_ldm.py: adopt the private data's labels (builds the compact label table)
        family.adopt_labels({i: f"class {i}" for i in range(DIT_PRIVATE_CLASSES)})
    return family


def synthetic_inputs(args, family, n: int, seed: int):
    """``n`` encoded examples of the family's ``encode`` layout: latents ([mean, std] for a KL autoencoder,
    [latents] for a VQ one) and the conditioning (labels, token ids, or none)."""
    if not args._family:
        return synthetic_latents(family, n, seed)
    import torch

    from dp_diffusers.families.common import vae_scale_factor

    vae = family.vae
    size = family.resolution // vae_scale_factor(vae)
    g = torch.Generator().manual_seed(seed)
    shape = (n, vae.config.latent_channels, size, size)
    tensors = [torch.randn(*shape, generator=g)]
    if "VQ" not in type(vae).__name__:
        tensors.append(0.1 * torch.rand(*shape, generator=g))
    if args._family == "ours":
        tensors.append(torch.randint(0, family.embedder.config.num_classes, (n,), generator=g))
    elif args._family == "dit":
        tensors.append(torch.randint(0, DIT_PRIVATE_CLASSES, (n,), generator=g))
    elif args._family == "text":
        labels = torch.randint(0, 10, (n,), generator=g).tolist()
        tensors.append(family.tokenize([family.template.format(label=f"class {y}") for y in labels]))
    return torch.utils.data.TensorDataset(*tensors)


def select(family, scope: str, args=None):
    from dp_diffusers.trainable import TrainableConfig, select_trainable

    if args is not None and args._family:  # as train_dp_ldm.py selects for any family
        if scope != "attention":
            raise ValueError(f"--family {args._family}: only the attention-only configurations are measured")
        return select_trainable(
            family.denoiser,
            config=TrainableConfig(),
            embedder=family.embedder,
            block_classes=family.attention_block_classes,
        )

    layers = args.attention_layers if args is not None else None
    embedder = not (args is not None and args.freeze_embedder)
    if scope == "attention":
        # the paper's (and train_dp_ldm.py's) default: attention blocks + embedder
        config = TrainableConfig(attention_layers=layers, train_embedder=embedder)
    elif scope == "projections":
        config = TrainableConfig(scope="attention_projections", attention_layers=layers, train_embedder=embedder)
    else:
        config = TrainableConfig(target_modules=r".*")  # every UNet module
    report = select_trainable(family.unet, config=config, embedder=family.embedder)
    if scope == "full":
        assert all(p.requires_grad for p in family.unet.parameters())
    return report


# ---------------------------------------------------------------------------------------------------- one config


class Timer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def build_run(args, name: str):
    """Model, engine and loader of configuration ``name``; returns a dict of everything the loop needs."""
    import torch

    from dp_diffusers.privacy import DPEngine, PrivacyConfig

    _, private, scope, mode, k = CONFIGS[name]
    device = torch.device(args.device)
    family = load_family(args)
    n = args.batch_size * args.physical_batches  # one logical batch
    dataset = synthetic_inputs(args, family, n, args.seed)
    report = select(family, scope, args)
    model = family.loss_module(cond_drop_prob=0.1).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    privacy = PrivacyConfig(
        target_epsilon=None,
        noise_multiplier=None if not private else NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        grad_sample_mode=mode,
        noise_multiplicity=k,
        expected_batch_size=n,
        max_physical_batch_size=args.batch_size,
        max_steps=MAX_STEPS,
        disable_dp=not private,
    )
    # dataset_size == expected_batch_size: Poisson rate 1, so every logical batch holds exactly n examples, split
    # into physical_batches physical batches of batch_size.
    engine = DPEngine(config=privacy, dataset_size=n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=n)
    model_dp, dp_optimizer, train_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, seed=args.seed
    )
    return {
        "engine": engine,
        "model": model_dp,
        "optimizer": dp_optimizer,
        "loader": train_loader,
        "device": device,
        "k": k,
        "report": report,
        "params": params,
    }


def logical_step(run, timer: Timer, phases: dict | None = None) -> None:
    """One logical step through the engine's loop (as train_dp_ldm.py runs it), timing its phases."""
    from dp_diffusers.privacy import repeat_rows

    engine, device, k = run["engine"], run["device"], run["k"]
    taken = False
    t = timer.now()
    for batch in engine.physical_batches(run["loader"]):
        rows = repeat_rows([x.to(device, non_blocking=True) for x in batch], k)
        if rows[0].shape[0] != run["expected_rows"]:
            raise RuntimeError(f"physical batch of {rows[0].shape[0]} rows, expected {run['expected_rows']}")
        t_data = timer.now()
        loss = run["model"](*rows)
        t_fwd = timer.now()
        engine.backward(loss)
        t_bwd = timer.now()
        taken = engine.step()
        t_step = timer.now()
        if phases is not None:
            phases["data"].append(t_data - t)
            phases["forward"].append(t_fwd - t_data)
            phases["backward"].append(t_bwd - t_fwd)
            phases["optimizer_step"].append(t_step - t_bwd)
        t = timer.now()
    if not taken:
        raise RuntimeError("the engine took no logical step")


def peak_rss_mib() -> float:
    """This process's peak resident set size, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of the address space made by exec. ``ru_maxrss``
    would be wrong here: the kernel carries the pre-exec high-water mark over exec, so a child spawned by a parent
    that imported torch reports at least the parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB


def send(message: dict) -> None:
    print(RESULT_MARK + json.dumps(message), flush=True)


def tune_allocator(args) -> bool:
    """What train_dp_ldm.py does on CPU unless --release_cpu_memory."""
    from dp_diffusers.runtime import retain_freed_memory

    return args.device == "cpu" and not args.release_cpu_memory and retain_freed_memory()


def child(args) -> None:
    """Runs in a fresh process, driven by the parent over stdin/stdout: builds one configuration (or the baseline),
    warms up, answers ``ready``; then runs one timed logical step per ``step`` line and, on ``end``, sends its
    figures. The parent interleaves the configurations' steps so that they share the machine's load alike."""
    import torch

    tune_allocator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    out = {"config": args._child, "torch_threads": torch.get_num_threads()}
    if args._child == BASELINE:
        family = load_family(args)
        dataset = synthetic_inputs(args, family, args.batch_size, args.seed)
        model = family.loss_module(cond_drop_prob=0.1).to(device).train()
        _ = dataset.tensors[0].to(device), model
        if device.type == "cuda":
            torch.cuda.synchronize()
            out["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        out["peak_rss_mib"] = peak_rss_mib()
        send(out)
        return
    description, private, scope, mode, k = CONFIGS[args._child]
    out.update(
        description=description,
        private=private,
        scope=scope,
        grad_sample_mode=mode,
        noise_multiplicity=k,
        batch_size=args.batch_size,
        physical_batches=args.physical_batches,
        examples_per_step=args.batch_size * args.physical_batches,
        rows_per_batch=args.batch_size * k,
    )
    timer = Timer(device)
    try:
        run = build_run(args, args._child)  # fails e.g. for a grad sample mode the engine refuses for this model
        run["expected_rows"] = args.batch_size * k
        report = run["report"]
        out.update(
            trainable_parameters=report.trainable,
            total_parameters=report.total,
            trainable_fraction=report.fraction,
            trained_modules=len(report.modules),
            trainable_tensors=len(run["params"]),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            logical_step(run, timer)
    except Exception as e:
        send({**out, "error": f"{type(e).__name__}: {e}", "peak_rss_mib": peak_rss_mib()})
        return
    send({"ready": True})
    phases, totals = defaultdict(list), []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        try:
            t0 = timer.now()
            logical_step(run, timer, phases)
            totals.append(timer.now() - t0)
        except Exception as e:
            send({**out, "error": f"{type(e).__name__}: {e}", "peak_rss_mib": peak_rss_mib()})
            return
        send({"step_seconds": totals[-1]})
    if not totals:
        send({**out, "error": "no step was run", "peak_rss_mib": peak_rss_mib()})
        return
    median = statistics.median(totals)
    out.update(
        step_seconds_median=median,
        step_seconds_mean=statistics.fmean(totals),
        step_seconds_min=min(totals),
        step_seconds_all=totals,
        seconds_per_example=median / (args.batch_size * args.physical_batches),
        seconds_per_row=median / (args.batch_size * args.physical_batches * k),
        phase_seconds_median={key: statistics.median(v) for key, v in phases.items()},
        peak_rss_mib=peak_rss_mib(),
        engine_steps=run["engine"].steps,
    )
    if device.type == "cuda":
        out["cuda_baseline_allocated_mib"] = base / 2**20
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_memory_delta_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    send(out)


# ---------------------------------------------------------------------------------------------------- the parent


class Child:
    """One configuration's process, driven line by line."""

    def __init__(self, args, name: str):
        argv = [sys.executable, os.path.abspath(__file__), "--_child", name]
        argv += ["--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        argv += ["--physical_batches", str(args.physical_batches)]
        argv += ["--device", args.device, "--seed", str(args.seed)]
        if args.model:
            argv += ["--model", args.model]
        argv += ["--model_config", args.model_config]
        if args.attention_layers:
            argv += ["--attention_layers", args.attention_layers]
        if args.freeze_embedder:
            argv += ["--freeze_embedder"]
        if args._family:
            argv += ["--_family", args._family]
        if args.release_cpu_memory:
            argv += ["--release_cpu_memory"]
        env = dict(os.environ)
        if args.threads:
            argv += ["--threads", str(args.threads)]
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        self.proc.wait()
        self.stderr.seek(0)
        tail = [line.strip() for line in self.stderr.read().strip().splitlines()[-5:]]
        return {"config": self.name, "error": f"subprocess exited {self.proc.returncode}: " + " | ".join(tail)}

    def ask(self, command: str) -> dict:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.receive()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()
        self.stderr.close()


def measure(args, log) -> tuple[dict, dict]:
    """Baseline, then every configuration: each built and warmed up in its own process, then their timed steps
    interleaved round-robin (rotating the order each round)."""
    baseline_child = Child(args, BASELINE)
    baseline = baseline_child.receive()
    baseline_child.close()
    results, live = {}, {}
    for name in args.configs:
        log(f"  building and warming up {name} ...")
        c = Child(args, name)
        msg = c.receive()
        if msg.get("ready"):
            live[name] = c
        else:
            results[name] = msg
            c.close()
    log(f"  {args.steps} interleaved rounds of {len(live)} configurations ...")
    for i in range(args.steps):
        names = list(live)
        for name in names[i % max(len(names), 1) :] + names[: i % max(len(names), 1)]:
            msg = live[name].ask("step")
            if "step_seconds" not in msg:  # failed: its final message
                results[name] = msg
                live.pop(name).close()
    for name, c in live.items():
        results[name] = c.ask("end")
        c.close()
    return baseline, {name: results[name] for name in args.configs if name in results}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(results: dict, a: str, b: str, key: str = "seconds_per_example"):
    ra, rb = results.get(a, {}), results.get(b, {})
    if key in ra and key in rb and rb[key]:
        return ra[key] / rb[key]
    return None


def environment(args) -> dict:
    import diffusers
    import opacus
    import torch

    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": args.device,
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threads_requested": args.threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "model": args.model or f"{MODEL_CONFIGS[args.model_config]} (random init)",
        "attention_layers": args.attention_layers,
        "freeze_embedder": args.freeze_embedder,
        "batch_size": args.batch_size,
        "physical_batches": args.physical_batches,
        "steps": args.steps,
        "warmup": args.warmup,
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "retain_freed_memory": args.device == "cpu" and not args.release_cpu_memory,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def parent(args) -> dict:
    env = environment(args)

    def log(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    log(f"measuring {', '.join(args.configs)} (+ baseline), each in its own process ...")
    baseline, results = measure(args, log)
    for r in results.values():
        if args.device.startswith("cpu") and "peak_rss_mib" in r and "peak_rss_mib" in baseline and "error" not in r:
            r["peak_memory_delta_mib"] = r["peak_rss_mib"] - baseline["peak_rss_mib"]
    env["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["torch_threads_in_children"] = next(
        (r["torch_threads"] for r in results.values() if "torch_threads" in r), None
    )
    ratios = time_ratios(results, "seconds_per_example", "seconds_per_row")
    ratios.update(
        {
            "memory dp_attention_hooks / nonprivate_attention": ratio(
                results, "dp_attention_hooks", "nonprivate_attention", key="peak_memory_delta_mib"
            ),
            "memory dp_full_unet_hooks / dp_attention_hooks": ratio(
                results, "dp_full_unet_hooks", "dp_attention_hooks", key="peak_memory_delta_mib"
            ),
            "memory dp_attention_ghost / dp_attention_hooks": ratio(
                results, "dp_attention_ghost", "dp_attention_hooks", key="peak_memory_delta_mib"
            ),
            "memory dp_attention_bookkeeping / nonprivate_attention": ratio(
                results, "dp_attention_bookkeeping", "nonprivate_attention", key="peak_memory_delta_mib"
            ),
            "memory K=4 book-keeping / K=4 hooks": ratio(
                results, "dp_attention_bookkeeping_k4", "dp_attention_hooks_k4", key="peak_memory_delta_mib"
            ),
        }
    )
    for r in results.values():
        if "step_seconds_min" in r:
            r["seconds_per_example_min"] = r["step_seconds_min"] / r["examples_per_step"]
            r["seconds_per_row_min"] = r["seconds_per_example_min"] / r["noise_multiplicity"]
    ratios_min = time_ratios(results, "seconds_per_example_min", "seconds_per_row_min")
    return {
        "environment": env,
        "baseline": baseline,
        "results": results,
        "ratios": ratios,
        "ratios_of_min": ratios_min,
    }


def parent_families(args) -> dict:
    """``--family``: for each family, its tiny pipeline saved and reloaded, baseline + non-private + DP attention-only
    measured as in ``parent`` (the two configurations interleaved), one family after the other."""
    import copy

    names = [n for n in FAMILIES if n != "ours"] + ["ours"] if args.family == "all" else [args.family]
    env = environment(args)
    env["model"] = "tiny random pipelines of dp_diffusers/models/tiny.py (saved, reloaded with load_family)"
    env["configs"] = FAMILY_CONFIGS

    def log(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    families = {}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        for name in names:
            path = os.path.join(tmp, name)
            build_tiny_pipeline(name, args.seed).save_pretrained(path)
            sub = copy.copy(args)
            sub.model, sub._family, sub.configs = path, name, FAMILY_CONFIGS
            log(f"family {name}: {FAMILIES[name][1]} ...")
            baseline, results = measure(sub, log)
            for r in results.values():
                if args.device.startswith("cpu") and "error" not in r and "peak_rss_mib" in baseline:
                    r["peak_memory_delta_mib"] = r["peak_rss_mib"] - baseline["peak_rss_mib"]
                if "step_seconds_min" in r:
                    r["seconds_per_example_min"] = r["step_seconds_min"] / r["examples_per_step"]
            dp, nonpriv = "dp_attention_hooks", "nonprivate_attention"
            families[name] = {
                "pipeline": FAMILIES[name][1],
                "builder": FAMILIES[name][0],
                "baseline": baseline,
                "results": results,
                "ratios": {
                    "time dp / nonprivate": ratio(results, dp, nonpriv),
                    "time dp / nonprivate (fastest steps)": ratio(results, dp, nonpriv, key="seconds_per_example_min"),
                    "memory dp / nonprivate": ratio(results, dp, nonpriv, key="peak_memory_delta_mib"),
                },
            }
    env["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["torch_threads_in_children"] = next(
        (r["torch_threads"] for f in families.values() for r in f["results"].values() if "torch_threads" in r), None
    )
    return {"environment": env, "families": families}


def print_family_table(summary: dict) -> None:
    env = summary["environment"]
    print(
        f"{env['date_utc']}  device={env['device']}  cpu={env['cpu']} (nproc {env['nproc']})  "
        f"torch threads={env['torch_threads_in_children']}  torch {env['torch']}  opacus {env['opacus']}"
    )
    print(
        f"TINY random pipelines (dp_diffusers/models/tiny.py): ratios, not absolute times, are the point.  batch "
        f"{env['batch_size']} examples  {env['warmup']} warm-up + {env['steps']} timed steps  load avg "
        f"{fmt(env['load_average_1m_at_start'], '.2f')} -> {fmt(env['load_average_1m_at_end'], '.2f')}"
    )
    mem = "mem MiB" if env["device"] == "cpu" else "alloc MiB"
    header = (
        f"{'family':<14}{'trainable':>20}{'np s/step':>11}{'dp s/step':>11}{'np ms/ex':>10}{'dp ms/ex':>10}"
        f"{'dp/np':>7}{'(min)':>7}{'np ' + mem:>12}{'dp ' + mem:>12}{'mem dp/np':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, f in summary["families"].items():
        np_, dp = (f["results"].get(c, {}) for c in FAMILY_CONFIGS)
        errors = [f"{c}: {r['error']}" for c, r in f["results"].items() if "error" in r]
        if errors:
            print(f"{name:<14}  n/a: {'; '.join(errors)}")
            continue
        trainable = f"{dp['trainable_parameters']:,} ({100 * dp['trainable_fraction']:.1f}%)"
        r = f["ratios"]
        print(
            f"{name:<14}{trainable:>20}{np_['step_seconds_median']:>11.3f}{dp['step_seconds_median']:>11.3f}"
            f"{1e3 * np_['seconds_per_example']:>10.2f}{1e3 * dp['seconds_per_example']:>10.2f}"
            f"{fmt(r['time dp / nonprivate'], '.2f'):>6}x{fmt(r['time dp / nonprivate (fastest steps)'], '.2f'):>6}x"
            f"{fmt(np_.get('peak_memory_delta_mib'), '.0f'):>12}{fmt(dp.get('peak_memory_delta_mib'), '.0f'):>12}"
            f"{fmt(r['memory dp / nonprivate'], '.2f'):>10}x"
        )
    print(
        "(np = nonprivate_attention, dp = dp_attention_hooks: attention blocks + embedder, same batch; s/step = median"
        " step; dp/np = ratio of median (min: of fastest) steps; mem = peak RSS minus that of the family's baseline"
        " process: "
        + ", ".join(f"{n} {fmt(f['baseline'].get('peak_rss_mib'), '.0f')}" for n, f in summary["families"].items())
        + " MiB)"
    )
    for name, f in summary["families"].items():
        dp = f["results"].get("dp_attention_hooks", {})
        if "trained_modules" in dp:
            print(
                f"  {name}: {f['pipeline']}; {dp['trained_modules']} trained modules, "
                f"{dp['trainable_tensors']} tensors, of {dp['total_parameters']:,} denoiser + embedder parameters"
            )


def time_ratios(results: dict, per_example: str, per_row: str) -> dict:
    return {
        "dp_attention_hooks / nonprivate_attention": ratio(
            results, "dp_attention_hooks", "nonprivate_attention", key=per_example
        ),
        "dp_full_unet_hooks / dp_attention_hooks": ratio(
            results, "dp_full_unet_hooks", "dp_attention_hooks", key=per_example
        ),
        "dp_attention_ghost / dp_attention_hooks": ratio(
            results, "dp_attention_ghost", "dp_attention_hooks", key=per_example
        ),
        "dp_attention_bookkeeping / nonprivate_attention": ratio(
            results, "dp_attention_bookkeeping", "nonprivate_attention", key=per_example
        ),
        "dp_full_unet_hooks / dp_attention_bookkeeping": ratio(
            results, "dp_full_unet_hooks", "dp_attention_bookkeeping", key=per_example
        ),
        "K=4 / K=1 (per example)": ratio(results, "dp_attention_hooks_k4", "dp_attention_hooks", key=per_example),
        "K=4 / K=1 (per row)": ratio(results, "dp_attention_hooks_k4", "dp_attention_hooks", key=per_row),
        "K=4 / K=1 (per example, book-keeping)": ratio(
            results, "dp_attention_bookkeeping_k4", "dp_attention_bookkeeping", key=per_example
        ),
        "dp_projections_hooks / nonprivate_projections": ratio(
            results, "dp_projections_hooks", "nonprivate_projections", key=per_example
        ),
    }


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_table(summary: dict) -> None:
    env, results = summary["environment"], summary["results"]
    print(
        f"{env['date_utc']}  device={env['device']}  cpu={env['cpu']} (nproc {env['nproc']})  "
        f"torch threads={env['torch_threads_in_children']}  torch {env['torch']}  opacus {env['opacus']}"
        + ("  malloc: retain freed memory" if env.get("retain_freed_memory") else "")
    )
    print(
        f"model: {env['model']}  batch {env['batch_size']} examples x {env.get('physical_batches', 1)} physical "
        f"batches per step  {env['warmup']} warm-up + {env['steps']} timed "
        f"steps  load avg {fmt(env['load_average_1m_at_start'], '.2f')} -> {fmt(env['load_average_1m_at_end'], '.2f')}"
        + (f"  attention blocks {env['attention_layers']}" if env.get("attention_layers") else "")
        + ("  embedder frozen" if env.get("freeze_embedder") else "")
    )
    mem_label = "peak mem MiB" if env["device"] == "cpu" else "peak alloc MiB"
    header = (
        f"{'config':<24}{'trainable':>19}{'s/step':>9}{'min':>7}{'ms/example':>12}{'ms/row':>9}"
        f"{'data':>7}{'fwd':>7}{'bwd':>7}{'opt':>7}{mem_label:>16}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24}  n/a: {r['error']}")
            continue
        ph = r["phase_seconds_median"]
        trainable = f"{r['trainable_parameters']:,} ({100 * r['trainable_fraction']:.1f}%)"
        print(
            f"{name:<24}{trainable:>19}{r['step_seconds_median']:>9.3f}{r['step_seconds_min']:>7.3f}"
            f"{1e3 * r['seconds_per_example']:>12.2f}"
            f"{1e3 * r['seconds_per_row']:>9.2f}"
            + "".join(f"{ph.get(p, 0.0):>7.3f}" for p in ("data", "forward", "backward", "optimizer_step"))
            + f"{fmt(r.get('peak_memory_delta_mib'), '.0f'):>16}"
        )
    if env["device"] == "cpu":
        print(
            f"(peak mem = peak RSS of the configuration's process minus that of a process that only builds the model: "
            f"{fmt(summary['baseline'].get('peak_rss_mib'), '.0f')} MiB; phases: median seconds per physical batch)"
        )
    targets = {
        "dp_attention_hooks / nonprivate_attention": "target <= 1.15",
        "dp_full_unet_hooks / dp_attention_hooks": "target >= 4",
        "dp_attention_bookkeeping / nonprivate_attention": "target <= 1.15",
        "dp_full_unet_hooks / dp_attention_bookkeeping": "target >= 4",
    }
    print("ratios (of median seconds per example unless noted; of the fastest step in the second column):")
    shown = 0
    for key, value in summary["ratios"].items():
        of_min = summary["ratios_of_min"].get(key)
        if value is None and of_min is None:
            continue
        shown += 1
        second = f"{fmt(of_min, '.2f', 'n/a'):>8}x" if key in summary["ratios_of_min"] else " " * 9
        print(f"  {key:<50}{fmt(value, '.2f', 'n/a'):>8}x{second}  {targets.get(key, '')}")
    if not shown:
        print("  none: each ratio needs both of its configurations measured")


# ---------------------------------------------------------------------------------------------------- profiling


@contextmanager
def timed_opacus(totals: dict, timer: Timer):
    """Wraps Opacus' grad samplers, norm samplers and DPOptimizer's clip/noise and the inner AdamW with timers."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer

    from dp_diffusers.privacy import NoiseMultiplicityMixin

    patched = []

    def wrap_table(table, label):
        for cls, fn in list(table.items()):

            def timed(*a, _fn=fn, _key=f"{label}[{cls.__name__}]", **kw):
                t = timer.now()
                try:
                    return _fn(*a, **kw)
                finally:
                    totals[_key] += timer.now() - t

            table[cls] = timed
            patched.append((table, cls, fn))

    wrap_table(GradSampleModule.GRAD_SAMPLERS, "grad_sampler")
    wrap_table(GradSampleModuleFastGradientClipping.NORM_SAMPLERS, "norm_sampler")
    originals = []
    methods = [(DPOptimizer, m, f"optimizer.{m}") for m in ("clip_and_accumulate", "add_noise", "scale_grad")]
    methods += [(DPOptimizer, "pre_step", "optimizer.pre_step (clip + noise + scale + accountant)")]
    methods += [(NoiseMultiplicityMixin, "clip_and_accumulate", "optimizer.K-row mean + clip_and_accumulate")]
    for owner, meth, key in methods:
        orig = owner.__dict__[meth]
        originals.append((owner, meth, orig))

        def timed_method(self, *a, _orig=orig, _key=key, **kw):
            t = timer.now()
            try:
                return _orig(self, *a, **kw)
            finally:
                totals[_key] += timer.now() - t

        setattr(owner, meth, timed_method)
    try:
        yield
    finally:
        for table, cls, fn in patched:
            table[cls] = fn
        for owner, meth, orig in originals:
            setattr(owner, meth, orig)


def profile(args) -> None:
    import torch

    tune_allocator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.profile
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    run = build_run(args, name)
    run["expected_rows"] = args.batch_size * run["k"]
    timer = Timer(run["device"])
    inner = getattr(run["optimizer"], "original_optimizer", run["optimizer"])
    totals = defaultdict(float)
    orig_step = inner.step

    def timed_inner_step(*a, **kw):
        t = timer.now()
        try:
            return orig_step(*a, **kw)
        finally:
            totals["inner AdamW.step"] += timer.now() - t

    inner.step = timed_inner_step
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
        f"{wall / args.steps:.3f} s/step, "
        f"torch threads {torch.get_num_threads()}"
    )
    for key, v in phases.items():
        print(f"  phase {key:<40}{sum(v) / args.steps:>9.4f} s/step")
    for key, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<46}{v / args.steps:>9.4f} s/step")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if run["device"].type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(min(args.steps, 3)):
            logical_step(run, timer)
    sort = "self_cuda_time_total" if run["device"].type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def main() -> None:
    args = parse_args()
    if args._child:
        child(args)
        return
    if args.profile:
        profile(args)
        return
    if args.family != "ours":
        summary = parent_families(args)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print_family_table(summary)
        return
    summary = parent(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
