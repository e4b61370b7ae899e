"""What the guarantee rests on, checked on the engine: secret noise and sampling, the clip bound under bf16, and
empty Poisson batches that still take their (noise-only) step."""

from __future__ import annotations

import secrets

import pytest
import torch
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from test_bookkeeping import SeqToy, data, loss_rows
from torch.utils.data import DataLoader

from dp_diffusers.privacy import DPEngine, PrivacyConfig
from dp_diffusers.privacy.grad_sample import DPGradSampleModule
from dp_diffusers.privacy.optimizers import EngineDPOptimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, B = 24, 6


def run(*, seed=None, steps=12, mode="bookkeeping", k=1, noise_generator=None, lr=0.5, fail_on_empty=False):
    """Trains SeqToy through the engine from the same global RNG state every time; returns (model, the Poisson
    batch sizes drawn, engine, initial trained parameters)."""
    torch.manual_seed(0)
    model = SeqToy()
    if fail_on_empty:  # as diffusers' attention does on zero rows
        forward = model.forward

        def guarded(x, y):
            if x.shape[0] == 0:
                raise RuntimeError("cannot run on 0 rows")
            return forward(x, y)

        model.forward = guarded
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", expected_batch_size=B,
        max_steps=steps, grad_sample_mode=mode, noise_multiplicity=k,
    )  # fmt: skip
    engine = DPEngine(config=cfg, dataset_size=N)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    module, _, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(params, lr=lr),
        data_loader=DataLoader(data(N), batch_size=B),
        seed=seed,
        noise_generator=noise_generator,
    )
    sizes = []
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            sizes.append(len(batch[0]))
            engine.backward(None if engine.batch_is_empty else loss_rows(module, batch, k))
            engine.step()
    return model, sizes, engine, start


def trained(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


# ---------------------------------------------------------------------------------------------------- randomness


def test_the_same_global_seed_gives_different_noise_and_masks():
    """torch.manual_seed (what --seed sets) no longer fixes the DP noise or the Poisson masks."""
    a, sizes_a, engine, _ = run()
    b, sizes_b, _, _ = run()
    assert not torch.equal(trained(a), trained(b))
    assert sizes_a != sizes_b  # 12 Poisson draws of 24 examples at q = 0.25: equal by chance with tiny probability
    randomness = engine.summary()["randomness"]
    assert randomness["noise"] == randomness["sampling"] == "os_entropy" and randomness["valid_dp_release"]
    assert "OS entropy" in randomness["noise_source"]


def test_the_noise_and_the_masks_leave_the_global_generator_alone():
    """The loss below draws nothing from torch's global generator, so if the engine drew the noise or the masks
    from it (seeded by --seed), its state would move."""
    torch.manual_seed(0)
    model = SeqToy()
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", expected_batch_size=B, max_steps=5
    )
    engine = DPEngine(config=cfg, dataset_size=N)
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.get_rng_state()
    module, _, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1), data_loader=DataLoader(data(N), batch_size=B)
    )
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            engine.backward(None if engine.batch_is_empty else loss_rows(module, batch, 1))
            engine.step()
    assert engine.steps == 5
    assert torch.equal(torch.get_rng_state(), before)


def test_secret_seeds_come_from_the_os(monkeypatch):
    drawn = []
    real = secrets.randbits

    def spy(bits):
        drawn.append(real(bits))
        return drawn[-1]

    monkeypatch.setattr(secrets, "randbits", spy)
    run(steps=1)
    assert len(drawn) == 2  # one for the noise, one for this process's Poisson sampler


def test_a_seeded_run_is_reproducible_and_says_it_is_not_a_valid_release():
    a, sizes_a, engine, _ = run(seed=5)
    b, sizes_b, _, _ = run(seed=5)
    assert torch.equal(trained(a), trained(b)) and sizes_a == sizes_b
    randomness = engine.summary()["randomness"]
    assert randomness["noise"] == randomness["sampling"] == "seeded"
    assert randomness["valid_dp_release"] is False and "NOT a valid DP release" in randomness["noise_source"]
    _, _, caller, _ = run(noise_generator=torch.Generator().manual_seed(1))
    assert caller.summary()["randomness"]["noise"] == "caller_generator"
    assert caller.summary()["randomness"]["valid_dp_release"] is False


# ---------------------------------------------------------------------------------------------------- clip bound


@pytest.mark.parametrize("bookkeeping", [False, True], ids=["hooks", "bookkeeping"])
def test_every_clipped_contribution_is_within_C_under_bf16(bookkeeping):
    """Under bf16 autocast the activations and backprops are bf16; norms, clip factors and the clipped sum must be
    float32, or an example's clipped gradient exceeds C (by ~1e-3 relative with bf16 norms)."""
    torch.manual_seed(0)
    model = SeqToy()
    c = 1e-3
    module = DPGradSampleModule(model, bookkeeping=bookkeeping, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = EngineDPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=1,
        loss_reduction="mean",
    )  # fmt: skip
    x, y, t = data(64, seed=1).tensors
    worst = 0.0
    for i in range(64):  # one example per batch: its clipped contribution is the clipped sum
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x[i : i + 1] * 5, y[i : i + 1])
        ((out.float() - t[i : i + 1]) ** 2).mean(dim=1).mean().backward()
        if bookkeeping:
            assert model.mix.weight.grad_sample.shape == (1,)  # the ghost-norm path ran
        optimizer.clip_and_accumulate()
        norm = torch.cat([p.summed_grad.double().flatten() for p in params]).norm().item()
        assert norm > 0.99 * c  # clipping is active: every example's gradient is far above C
        worst = max(worst, norm / c)
        optimizer.zero_grad(set_to_none=True)
    assert worst <= 1 + 1e-6, worst


# ---------------------------------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize(
    ("mode", "k"), [("hooks", 1), ("bookkeeping", 1), ("bookkeeping", 2), ("functorch", 1), ("ghost", 1)]
)
def test_an_empty_poisson_batch_takes_a_noise_only_step(monkeypatch, mode, k):
    """Every Poisson draw forced empty, on a model that cannot run on zero rows: each step still happens, adds the
    noise alone (Opacus' own draw, the same generator) and is counted by the accountant."""
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[]] * self.steps))
    steps, lr = 3, 0.5
    model, sizes, engine, start = run(
        steps=steps, mode=mode, k=k, noise_generator=torch.Generator().manual_seed(7), lr=lr, fail_on_empty=True
    )
    assert sizes == [0] * steps and engine.steps == steps
    assert engine.accountant.history == [(1.0, B / N, steps)]
    g = torch.Generator().manual_seed(7)
    expected = [s.clone() for s in start]
    for _ in range(steps):  # noise std sigma * C, divided by the expected batch B, SGD step
        for e in expected:
            e -= lr * _generate_noise(std=1.0, reference=torch.zeros_like(e), generator=g, secure_mode=True) / B
    params = [p for p in model.parameters() if p.requires_grad]
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_backward_none_is_refused_on_a_batch_with_examples():
    cfg = PrivacyConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", expected_batch_size=B, max_steps=2
    )
    model = SeqToy()
    engine = DPEngine(config=cfg, dataset_size=N)
    params = [p for p in model.parameters() if p.requires_grad]
    _, _, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1), data_loader=DataLoader(data(N), batch_size=B)
    )
    for _ in engine.physical_batches(loader):
        if not engine.batch_is_empty:
            with pytest.raises(ValueError, match="empty Poisson batch"):
                engine.backward(None)
            break
