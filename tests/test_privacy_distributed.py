"""Two CPU processes (torchrun, gloo) give the same privacy guarantee as one: noise once, same epsilon, same model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
    ),
]

REPO = Path(__file__).resolve().parents[1]
N, B, SIGMA, C, NOISE_SEED = 40, 8, 1.0, 0.5, 1234

SCRIPT = textwrap.dedent(
    f"""
    import sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from dp_diffusers.privacy import DPEngine, PrivacyConfig, repeat_rows

    N, B, SIGMA, C, NOISE_SEED = {N}, {B}, {SIGMA}, {C}, {NOISE_SEED}


    def toy():
        torch.manual_seed(dist.get_rank())  # different on each rank: the engine must broadcast rank 0's weights
        return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


    def data():
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(N, 6, generator=g), torch.randn(N, 3, generator=g))


    def run(cfg, loss_fn, *, lr=0.05, noise_generator=None):
        model = toy()
        engine = DPEngine(config=cfg, dataset_size=N)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        module, _, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(data(), batch_size=B), noise_generator=noise_generator
        )
        start = [p.detach().clone() for p in model.parameters()]
        sizes = []
        while not engine.finished:
            for x, t in engine.physical_batches(loader):
                sizes.append(len(x))
                engine.backward(loss_fn(module, x, t, cfg.noise_multiplicity))
                engine.step()
        params = [p.detach().clone() for p in model.parameters()]
        return {{"start": start, "params": params, "epsilon": engine.epsilon, "steps": engine.steps,
                 "sizes": sizes, "world_size": engine.world_size}}


    def mse(module, x, t, k):
        x, t = repeat_rows((x, t), k)
        x = x + 0.1 * torch.randn_like(x)
        return ((module(x) - t) ** 2).mean(dim=1)


    def zero(module, x, t, k):
        return (module(x) * 0.0).sum(dim=1)  # every per-example gradient is exactly 0: the update is the noise


    dist.init_process_group("gloo")
    torch.manual_seed(100 + dist.get_rank())
    base = dict(target_epsilon=None, noise_multiplier=SIGMA, max_grad_norm=C, accountant="rdp",
                expected_batch_size=B, max_physical_batch_size=2)
    out = {{
        "hooks": run(PrivacyConfig(**base, max_steps=5, noise_multiplicity=2, grad_sample_mode="hooks"), mse),
        "bookkeeping": run(PrivacyConfig(**base, max_steps=4, noise_multiplicity=2, grad_sample_mode="bookkeeping"),
                           mse),
        "ghost": run(PrivacyConfig(**base, max_steps=3, grad_sample_mode="ghost"), mse),
        "noise": run(PrivacyConfig(**base, max_steps=1), zero, lr=1.0,
                     noise_generator=torch.Generator().manual_seed(NOISE_SEED)),
        "plain": run(PrivacyConfig(**{{**base, "noise_multiplier": None}}, max_steps=3, disable_dp=True), mse),
    }}
    torch.save(out, f"{{sys.argv[1]}}/rank{{dist.get_rank()}}.pt")
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("scenario", ["hooks", "bookkeeping", "ghost", "plain"])
def test_ranks_end_with_identical_parameters(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] > 0
    for a, b in zip(r0["start"], r1["start"], strict=True):  # rank 0's weights were broadcast
        assert torch.equal(a, b)
    for a, b, s in zip(r0["params"], r1["params"], r0["start"], strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, s)


def test_each_rank_draws_its_own_poisson_shard(ranks):
    r0, r1 = ranks[0]["hooks"], ranks[1]["hooks"]
    assert r0["sizes"] != r1["sizes"]  # different shards; the split into physical batches may differ too
    assert max(r0["sizes"] + r1["sizes"]) <= 2


@pytest.mark.parametrize("scenario", ["hooks", "bookkeeping", "ghost"])
def test_epsilon_equals_the_single_process_run(ranks, scenario):
    from torch.utils.data import DataLoader, TensorDataset

    from dp_diffusers.privacy import DPEngine, PrivacyConfig

    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["epsilon"] == r1["epsilon"]
    steps = r0["steps"]
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=SIGMA, max_grad_norm=C, accountant="rdp", expected_batch_size=B,
        max_physical_batch_size=2, max_steps=steps, grad_sample_mode=scenario,
    )  # fmt: skip
    model = torch.nn.Linear(6, 3)
    engine = DPEngine(config=cfg, dataset_size=N)
    data = TensorDataset(torch.randn(N, 6), torch.randn(N, 3))
    module, _, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=B)
    )
    while not engine.finished:
        for x, t in engine.physical_batches(loader):
            engine.backward(((module(x) - t) ** 2).mean(dim=1))
            engine.step()
    assert engine.steps == steps
    assert engine.epsilon == r0["epsilon"]


def test_noise_is_added_once(ranks):
    r0, r1 = ranks[0]["noise"], ranks[1]["noise"]
    assert r0["steps"] == 1
    from opacus.optimizers.optimizer import _generate_noise

    g = torch.Generator().manual_seed(NOISE_SEED)
    for start, p0, p1 in zip(r0["start"], r0["params"], r1["params"], strict=True):
        # Opacus' own draw, in its secure_mode sampling (what the engine uses), from the same generator
        noise = _generate_noise(std=SIGMA * C, reference=torch.zeros_like(start), generator=g, secure_mode=True)
        # rank 0 adds one draw to its zero clipped sum, rank 1 adds none; Opacus divides by B / 2 per rank, the
        # all-reduce sums and divides by 2: the averaged update is noise / B, as in a single process.
        expected = start - 1.0 * (noise / (B / 2) / 2)
        torch.testing.assert_close(p0, expected, atol=1e-7, rtol=1e-6)
        assert torch.equal(p0, p1)
