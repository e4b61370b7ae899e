"""What ``step_cost.py``'s measurements share: the scenarios, one logical training step, the worker processes that
time it (one per scenario, driven over stdin/stdout), peak memory, and the table printer. See benchmarks/README.md.
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dp_diffusers import DPLDMPipeline
from dp_diffusers.families import ClassConditionalLDM, load_family
from dp_diffusers.families.common import vae_scale_factor
from dp_diffusers.models import configs
from dp_diffusers.privacy import DPEngine, PrivacyConfig, repeat_rows
from dp_diffusers.trainable import SCOPE_DESCRIPTIONS, TrainableConfig, TrainableReport, select_trainable

CLI = Path(__file__).with_name("step_cost.py")  # the worker processes run it with --_child
MAX_STEPS = 10**9  # the engine's step plan: never reached
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1e-3  # train_dp_ldm.py's default (every per-example gradient is clipped)
DIT_PRIVATE_CLASSES = 10  # the DiT adopts this many private labels, as train_dp_ldm.py does
BASELINE = "baseline"  # the worker that only builds the model, the loss module and the data
RESULT_MARK = "@@STEP_COST_RESULT@@ "
#: --model_config name -> LDMConfig constant in dp_diffusers.models.configs
MODEL_CONFIGS = {"default": "DEFAULT", "tiny": "TINY", "paper_cifar10": "PAPER_CIFAR10"}

# ---------------------------------------------------------------------------------------------------- scenarios

_MODE_TEXT = {"hooks": "hooks", "ghost": "ghost clipping", "bookkeeping": "book-keeping"}


@dataclass(frozen=True)
class Scenario:
    """One configuration of a training step: what trains (a ``TrainableConfig`` scope, + the embedder) and how."""

    private: bool
    scope: str  # one of dp_diffusers.trainable.SCOPES
    grad_sample_mode: str = "hooks"
    noise_multiplicity: int = 1  # K loss rows per example
    optional: bool = False  # not in the default --configs

    @property
    def name(self) -> str:
        k = f"_k{self.noise_multiplicity}" if self.noise_multiplicity > 1 else ""
        return f"dp_{self.scope}_{self.grad_sample_mode}{k}" if self.private else f"nonprivate_{self.scope}{k}"

    @property
    def description(self) -> str:
        how = _MODE_TEXT[self.grad_sample_mode] if self.private else "(AdamW)"
        k = f", K={self.noise_multiplicity}" if self.noise_multiplicity > 1 else ""
        what = SCOPE_DESCRIPTIONS[self.scope].removeprefix("the ")  # the card's words, one table for both
        return f"{'DP' if self.private else 'non-private'}, {what} + embedder, {how}{k}"

    def trainable_config(self, attention_layers: str | None = None, train_embedder: bool = True) -> TrainableConfig:
        """As ``train_dp_ldm.py --trainable_scope``; ``attention_layers`` / ``train_embedder`` narrow the attention
        scopes only (scope "full" trains every denoiser parameter and the embedder)."""
        if self.scope == "full":
            return TrainableConfig(scope="full")
        return TrainableConfig(scope=self.scope, attention_layers=attention_layers, train_embedder=train_embedder)

    def privacy_config(self, batch_size: int, physical_batches: int) -> PrivacyConfig:
        """A fixed noise multiplier, no target epsilon and an unreachable step plan: the engine never stops."""
        return PrivacyConfig(
            target_epsilon=None,
            noise_multiplier=NOISE_MULTIPLIER if self.private else None,
            max_grad_norm=MAX_GRAD_NORM,
            grad_sample_mode=self.grad_sample_mode,
            noise_multiplicity=self.noise_multiplicity,
            expected_batch_size=batch_size * physical_batches,
            max_physical_batch_size=batch_size,
            max_steps=MAX_STEPS,
            disable_dp=not self.private,
        )


SCENARIOS = {
    s.name: s
    for s in [
        Scenario(private=False, scope="attention_blocks"),
        Scenario(private=True, scope="attention_blocks"),
        Scenario(private=True, scope="attention_blocks", grad_sample_mode="ghost"),
        Scenario(private=True, scope="attention_blocks", grad_sample_mode="bookkeeping"),
        Scenario(private=True, scope="full"),
        Scenario(private=True, scope="attention_blocks", noise_multiplicity=4),
        Scenario(
            private=True, scope="attention_blocks", grad_sample_mode="bookkeeping", noise_multiplicity=4, optional=True
        ),
        Scenario(private=False, scope="attention_projections", optional=True),
        Scenario(private=True, scope="attention_projections", optional=True),
        # lever 1 of the MNIST benchmark at train_dp_ldm.py's default mode (book-keeping), scope by scope
        Scenario(private=True, scope="attention_up_resnets", grad_sample_mode="bookkeeping", optional=True),
        Scenario(private=True, scope="full", grad_sample_mode="bookkeeping", optional=True),
    ]
}
DEFAULT_SCENARIOS = [name for name, s in SCENARIOS.items() if not s.optional]
#: The names before the scopes followed --trainable_scope (the README's older tables use them); still accepted.
RENAMED = {
    "nonprivate_attention": "nonprivate_attention_blocks",
    "dp_attention_hooks": "dp_attention_blocks_hooks",
    "dp_attention_ghost": "dp_attention_blocks_ghost",
    "dp_attention_bookkeeping": "dp_attention_blocks_bookkeeping",
    "dp_full_unet_hooks": "dp_full_hooks",
    "dp_attention_hooks_k4": "dp_attention_blocks_hooks_k4",
    "dp_attention_bookkeeping_k4": "dp_attention_blocks_bookkeeping_k4",
    "nonprivate_projections": "nonprivate_attention_projections",
    "dp_projections_hooks": "dp_attention_projections_hooks",
}


def scenario_name(name: str) -> str:
    """argparse ``type`` of --configs / --profile: a scenario name, an old one translated."""
    return RENAMED.get(name, name)


# ---------------------------------------------------------------------------------------------------- model and data


def load_model(args):
    """The ``dp_diffusers.families`` family measured: ``--model`` (any pipeline folder, loaded as train_dp_ldm.py
    loads a base model), else the ``--model_config`` class-conditional LDM, randomly initialised."""
    torch.manual_seed(args.seed)
    if not args.model:
        config = getattr(configs, MODEL_CONFIGS[args.model_config])
        return ClassConditionalLDM(DPLDMPipeline(**configs.build_class_conditional_ldm(config)))
    family = load_family(args.model)
    if family.name == "dit":  # train_dp_ldm.py: adopt the private data's labels (builds the compact label table)
        family.adopt_labels({i: f"class {i}" for i in range(DIT_PRIVATE_CLASSES)})
    return family


def synthetic_inputs(family, n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` encoded examples of the family's ``encode`` layout: latents ([mean, std] for a KL autoencoder,
    [latents] for a VQ one) and the conditioning (labels, token ids, or none)."""
    vae = family.vae
    size = family.resolution // vae_scale_factor(vae)
    g = torch.Generator().manual_seed(seed)
    shape = (n, vae.config.latent_channels, size, size)
    tensors = [torch.randn(*shape, generator=g)]
    if "VQ" not in type(vae).__name__:
        tensors.append(0.1 * torch.rand(*shape, generator=g))
    if family.name == "class-conditional-ldm":
        tensors.append(torch.randint(0, family.embedder.config.num_classes, (n,), generator=g))
    elif family.name == "dit":
        tensors.append(torch.randint(0, DIT_PRIVATE_CLASSES, (n,), generator=g))
    elif family.name == "text-conditional-ldm":
        labels = torch.randint(0, 10, (n,), generator=g).tolist()
        tensors.append(family.tokenize([family.template.format(label=f"class {y}") for y in labels]))
    return torch.utils.data.TensorDataset(*tensors)


# ---------------------------------------------------------------------------------------------------- one step


class Timer:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


@dataclass
class Run:
    """Everything one scenario's loop needs (built by :func:`build_run`)."""

    engine: DPEngine
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    device: torch.device
    k: int
    expected_rows: int
    report: TrainableReport
    params: list


def setup_process(args) -> torch.device:
    """What train_dp_ldm.py does first: glibc keeps freed memory on CPU (unless --release_cpu_memory), threads."""
    from dp_diffusers.runtime import retain_freed_memory

    if args.device == "cpu" and not args.release_cpu_memory:
        retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def build_run(args, scenario: Scenario, device: torch.device) -> Run:
    """The model, engine and loader of ``scenario``, as train_dp_ldm.py builds them. Every logical batch is exactly
    ``--physical_batches`` physical batches of exactly ``--batch_size`` examples: ``dataset_size ==
    expected_batch_size`` (Poisson rate q = 1 includes every example)."""
    family = load_model(args)
    n = args.batch_size * args.physical_batches  # one logical batch
    dataset = synthetic_inputs(family, n, args.seed)
    config = scenario.trainable_config(args.attention_layers, train_embedder=not args.freeze_embedder)
    report = select_trainable(
        family.denoiser, config=config, embedder=family.embedder, block_classes=family.attention_block_classes
    )
    model = family.loss_module(cond_drop_prob=0.1).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = DPEngine(config=scenario.privacy_config(args.batch_size, args.physical_batches), dataset_size=n)
    model_dp, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.AdamW(params, lr=1e-4),
        data_loader=torch.utils.data.DataLoader(dataset, batch_size=n),
        seed=args.seed,
    )
    k = scenario.noise_multiplicity
    return Run(engine, model_dp, optimizer, loader, device, k, args.batch_size * k, report, params)


def logical_step(run: Run, timer: Timer, phases: dict | None = None) -> None:
    """One logical step through the engine's loop (as train_dp_ldm.py runs it), timing its phases."""
    engine = run.engine
    taken = False
    t = timer.now()
    for batch in engine.physical_batches(run.loader):
        rows = repeat_rows([x.to(run.device, non_blocking=True) for x in batch], run.k)
        if rows[0].shape[0] != run.expected_rows:
            raise RuntimeError(f"physical batch of {rows[0].shape[0]} rows, expected {run.expected_rows}")
        t_data = timer.now()
        loss = run.model(*rows)
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


# ---------------------------------------------------------------------------------------------------- the workers


def send(message: dict) -> None:
    print(RESULT_MARK + json.dumps(message), flush=True)


def worker(args) -> None:
    """Runs in a fresh process (``--_child NAME``), driven by the parent over stdin/stdout: builds one scenario (or
    the baseline), warms up, answers ``ready``; then runs one timed logical step per ``step`` line and, on ``end``,
    sends its figures."""
    device = setup_process(args)
    out = {"config": args._child, "torch_threads": torch.get_num_threads()}
    if args._child == BASELINE:
        family = load_model(args)
        dataset = synthetic_inputs(family, args.batch_size, args.seed)
        model = family.loss_module(cond_drop_prob=0.1).to(device).train()
        _ = dataset.tensors[0].to(device), model
        if device.type == "cuda":
            torch.cuda.synchronize()
            out["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        send({**out, "peak_rss_mib": peak_rss_mib()})
        return
    scenario = SCENARIOS[args._child]
    k, n = scenario.noise_multiplicity, args.batch_size * args.physical_batches
    out.update(
        description=scenario.description,
        private=scenario.private,
        scope=scenario.scope,
        grad_sample_mode=scenario.grad_sample_mode,
        noise_multiplicity=k,
        batch_size=args.batch_size,
        physical_batches=args.physical_batches,
        examples_per_step=n,
        rows_per_batch=args.batch_size * k,
    )
    timer = Timer(device)
    try:
        run = build_run(args, scenario, device)  # fails e.g. for a grad sample mode the engine refuses for this model
        out.update(
            trainable_parameters=run.report.trainable,
            total_parameters=run.report.total,
            trainable_fraction=run.report.fraction,
            trained_modules=len(run.report.modules),
            trainable_tensors=len(run.params),
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
        seconds_per_example=median / n,
        seconds_per_row=median / (n * k),
        phase_seconds_median={key: statistics.median(v) for key, v in phases.items()},
        peak_rss_mib=peak_rss_mib(),
        engine_steps=run.engine.steps,
    )
    if device.type == "cuda":
        out["cuda_baseline_allocated_mib"] = base / 2**20
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_memory_delta_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    send(out)


class Worker:
    """One scenario's process (``step_cost.py --_child NAME``), driven line by line."""

    def __init__(self, args, name: str):
        argv = [sys.executable, str(CLI), "--_child", name, "--model_config", args.model_config]
        for flag in ("batch_size", "physical_batches", "steps", "warmup", "device", "seed", "model", "threads"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        if args.attention_layers:
            argv += ["--attention_layers", args.attention_layers]
        argv += [f"--{flag}" for flag in ("freeze_embedder", "release_cpu_memory") if getattr(args, flag)]
        env = dict(os.environ)
        if args.threads:
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


def measure(args, names: list[str], heading: str) -> tuple[dict, dict]:
    """The baseline, then every scenario of ``names``: each built and warmed up in its own process, then their timed
    steps interleaved round-robin (the order rotated each round), so that all see the same background load. Returns
    the baseline's and the scenarios' figures, with the memory delta and the fastest step per example / row.
    ``heading`` and the progress go to stderr (not with --json)."""

    def log(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    log(heading)
    baseline_worker = Worker(args, BASELINE)
    baseline = baseline_worker.receive()
    baseline_worker.close()
    results, live = {}, {}
    for name in names:
        log(f"  building and warming up {name} ...")
        w = Worker(args, name)
        msg = w.receive()
        if msg.get("ready"):
            live[name] = w
        else:
            results[name] = msg
            w.close()
    log(f"  {args.steps} interleaved rounds of {len(live)} configurations ...")
    for i in range(args.steps):
        order = list(live)
        shift = i % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            msg = live[name].ask("step")
            if "step_seconds" not in msg:  # failed: its final message
                results[name] = msg
                live.pop(name).close()
    for name, w in live.items():
        results[name] = w.ask("end")
        w.close()
    results = {name: results[name] for name in names if name in results}
    for r in results.values():
        if "error" in r:
            continue
        if args.device.startswith("cpu") and "peak_rss_mib" in r and "peak_rss_mib" in baseline:
            r["peak_memory_delta_mib"] = r["peak_rss_mib"] - baseline["peak_rss_mib"]
        if "step_seconds_min" in r:
            r["seconds_per_example_min"] = r["step_seconds_min"] / r["examples_per_step"]
            r["seconds_per_row_min"] = r["seconds_per_example_min"] / r["noise_multiplicity"]
    return baseline, results


# ---------------------------------------------------------------------------------------------------- the summary


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(args) -> dict:
    import diffusers
    import opacus

    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": args.device,
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "load_average_1m_at_start": load_average(),
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


def finish_environment(env: dict, results: list[dict]) -> None:
    """The figures known once every worker has ended."""
    env["load_average_1m_at_end"] = load_average()
    env["torch_threads_in_children"] = next((r["torch_threads"] for r in results if "torch_threads" in r), None)


def ratio(results: dict, a: str, b: str, key: str = "seconds_per_example") -> float | None:
    ra, rb = results.get(a, {}), results.get(b, {})
    if key in ra and key in rb and rb[key]:
        return ra[key] / rb[key]
    return None


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


@dataclass(frozen=True)
class Column:
    """A right-aligned table column: its title, width and text (from one row's figures)."""

    title: str
    width: int
    text: Callable[[dict], str]


def print_table(env: dict, lines: list[str], label: tuple[str, int], columns: list[Column], rows: dict) -> None:
    """The environment line, ``lines``, then one row per entry of ``rows`` (a label -> its figures, or an error
    string printed as "n/a"); ``label``: the title and least width of the labels' column."""
    print(
        f"{env['date_utc']}  device={env['device']}  cpu={env['cpu']} (nproc {env['nproc']})  "
        f"torch threads={env['torch_threads_in_children']}  torch {env['torch']}  opacus {env['opacus']}"
        + ("  malloc: retain freed memory" if env.get("retain_freed_memory") else "")
    )
    for line in lines:
        print(line)
    title, width = label
    width = max([width, *(len(name) + 1 for name in rows)])  # the labels stay aligned
    header = f"{title:<{width}}" + "".join(f"{c.title:>{c.width}}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"{name:<{width}}  n/a: {row}")
        else:
            print(f"{name:<{width}}" + "".join(f"{c.text(row):>{c.width}}" for c in columns))


def trainable_text(r: dict) -> str:
    return f"{r['trainable_parameters']:,} ({100 * r['trainable_fraction']:.1f}%)"
