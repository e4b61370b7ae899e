"""``step_cost.py --family ours`` (the default): every ``--configs`` scenario on the class-conditional LDM
(``--model`` / ``--model_config``), one table and the ratios the targets are read from."""

from __future__ import annotations

from dataclasses import dataclass

from step_cost_utils import Column, environment, finish_environment, fmt, measure, print_table, ratio, trainable_text


@dataclass(frozen=True)
class Ratio:
    """``a``'s figure over ``b``'s: seconds per example (``per="row"``: per loss row) or, in MEMORY_RATIOS, the
    peak memory delta."""

    a: str
    b: str
    label: str | None = None
    per: str = "example"
    target: str = ""

    @property
    def key(self) -> str:
        return self.label or f"{self.a} / {self.b}"


HOOKS, NONPRIVATE, FULL = "dp_attention_blocks_hooks", "nonprivate_attention_blocks", "dp_full_hooks"
BOOKKEEPING, GHOST = "dp_attention_blocks_bookkeeping", "dp_attention_blocks_ghost"
TIME_RATIOS = [
    Ratio(HOOKS, NONPRIVATE, target="target <= 1.15"),
    Ratio(FULL, HOOKS, target="target >= 4"),
    Ratio(GHOST, HOOKS),
    Ratio(BOOKKEEPING, NONPRIVATE, target="target <= 1.15"),
    Ratio(FULL, BOOKKEEPING, target="target >= 4"),
    Ratio(f"{HOOKS}_k4", HOOKS, "K=4 / K=1 (per example)"),
    Ratio(f"{HOOKS}_k4", HOOKS, "K=4 / K=1 (per row)", per="row"),
    Ratio(f"{BOOKKEEPING}_k4", BOOKKEEPING, "K=4 / K=1 (per example, book-keeping)"),
    Ratio("dp_attention_projections_hooks", "nonprivate_attention_projections"),
    Ratio("dp_attention_up_resnets_bookkeeping", BOOKKEEPING),
    Ratio("dp_full_bookkeeping", BOOKKEEPING),
]
MEMORY_RATIOS = [
    Ratio(HOOKS, NONPRIVATE),
    Ratio(FULL, HOOKS),
    Ratio(GHOST, HOOKS),
    Ratio(BOOKKEEPING, NONPRIVATE),
    Ratio(f"{BOOKKEEPING}_k4", f"{HOOKS}_k4", "K=4 book-keeping / K=4 hooks"),
    Ratio("dp_attention_up_resnets_bookkeeping", BOOKKEEPING),
    Ratio("dp_full_bookkeeping", BOOKKEEPING),
]
MEMORY_KEY = "peak_memory_delta_mib"


def run(args) -> dict:
    env = environment(args)
    heading = f"measuring {', '.join(args.configs)} (+ baseline), each in its own process ..."
    baseline, results = measure(args, args.configs, heading)
    finish_environment(env, list(results.values()))
    ratios = {r.key: ratio(results, r.a, r.b, key=f"seconds_per_{r.per}") for r in TIME_RATIOS}
    ratios.update({f"memory {r.key}": ratio(results, r.a, r.b, key=MEMORY_KEY) for r in MEMORY_RATIOS})
    ratios_of_min = {r.key: ratio(results, r.a, r.b, key=f"seconds_per_{r.per}_min") for r in TIME_RATIOS}
    return {
        "environment": env,
        "baseline": baseline,
        "results": results,
        "ratios": ratios,
        "ratios_of_min": ratios_of_min,
    }


def _phase(name: str):
    return lambda r: f"{r['phase_seconds_median'].get(name, 0.0):.3f}"


COLUMNS = [
    Column("trainable", 19, trainable_text),
    Column("s/step", 9, lambda r: f"{r['step_seconds_median']:.3f}"),
    Column("min", 7, lambda r: f"{r['step_seconds_min']:.3f}"),
    Column("ms/example", 12, lambda r: f"{1e3 * r['seconds_per_example']:.2f}"),
    Column("ms/row", 9, lambda r: f"{1e3 * r['seconds_per_row']:.2f}"),
    Column("data", 7, _phase("data")),
    Column("fwd", 7, _phase("forward")),
    Column("bwd", 7, _phase("backward")),
    Column("opt", 7, _phase("optimizer_step")),
]


def print_summary(summary: dict) -> None:
    env, results = summary["environment"], summary["results"]
    memory = Column(
        "peak mem MiB" if env["device"] == "cpu" else "peak alloc MiB", 16, lambda r: fmt(r.get(MEMORY_KEY), ".0f")
    )
    heading = (
        f"model: {env['model']}  batch {env['batch_size']} examples x {env.get('physical_batches', 1)} physical "
        f"batches per step  {env['warmup']} warm-up + {env['steps']} timed "
        f"steps  load avg {fmt(env['load_average_1m_at_start'], '.2f')} -> {fmt(env['load_average_1m_at_end'], '.2f')}"
        + (f"  attention blocks {env['attention_layers']}" if env.get("attention_layers") else "")
        + ("  embedder frozen" if env.get("freeze_embedder") else "")
    )
    rows = {name: r.get("error", r) for name, r in results.items()}
    print_table(env, [heading], ("config", 24), [*COLUMNS, memory], rows)
    if env["device"] == "cpu":
        print(
            f"(peak mem = peak RSS of the configuration's process minus that of a process that only builds the model: "
            f"{fmt(summary['baseline'].get('peak_rss_mib'), '.0f')} MiB; phases: median seconds per physical batch)"
        )
    targets = {r.key: r.target for r in TIME_RATIOS}
    of_min = summary["ratios_of_min"]
    shown = {k: v for k, v in summary["ratios"].items() if v is not None or of_min.get(k) is not None}
    print("ratios (of median seconds per example unless noted; of the fastest step in the second column):")
    width = max([50, *map(len, shown)])
    for key, value in shown.items():
        second = f"{fmt(of_min[key], '.2f', 'n/a'):>8}x" if key in of_min else " " * 9
        print(f"  {key:<{width}}{fmt(value, '.2f', 'n/a'):>8}x{second}  {targets.get(key, '')}")
    if not shown:
        print("  none: each ratio needs both of its configurations measured")
