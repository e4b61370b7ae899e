"""DPEngine on toy models: per-example gradients, clipping, frozen parameters, accounting, resume, guards, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from opacus.accountants import PRVAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_diffusers.errors import UserInputError
from dp_diffusers.privacy import (
    DPEngine,
    EpsilonBudget,
    PrivacyConfig,
    default_delta,
    epsilon_after,
    reduce_rows,
    repeat_rows,
    would_exceed,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N = 24


class Toy(nn.Module):
    """Conv + GroupNorm + Embedding + LayerNorm + Linear, with a frozen Linear in the middle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(64, 8)
        self.embed = nn.Embedding(5, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x, y):
        h = self.frozen(self.gn(self.conv(x)).flatten(1))
        e = self.embed(y)
        if e.shape[0] != h.shape[0]:  # labels given once per example: repeat after the embedding
            e = e.repeat_interleave(h.shape[0] // e.shape[0], dim=0)
        return self.head(self.ln(torch.tanh(h + e)))


def dataset(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g), torch.randn(n, 3, generator=g)
    )


def rows_of(batch, k: int, *, seed: int = 7, embed_per_example: bool = False):
    """Example-major rows with k independent input perturbations per example (the caller's 'noise draws')."""
    x, y, t = batch
    x, t = repeat_rows((x, t), k)
    if not embed_per_example:
        y = repeat_rows(y, k)
    g = torch.Generator().manual_seed(seed)
    return x + 0.3 * torch.randn(x.shape, generator=g), y, t


def per_row_loss(module, batch, k: int, **kw):
    x, y, t = rows_of(batch, k, **kw)
    return ((module(x, y) - t) ** 2).mean(dim=1)


def config(**kw) -> PrivacyConfig:
    base = dict(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", expected_batch_size=6, max_steps=3, epochs=None
    )
    base.update(kw)
    return PrivacyConfig(**base)


def private(cfg, model=None, *, lr=0.1, n=N, seed=0, opt_cls=torch.optim.SGD):
    model = model if model is not None else Toy()
    engine = DPEngine(config=cfg, dataset_size=n)
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = DataLoader(dataset(n), batch_size=cfg.expected_batch_size)
    module, optimizer, train_loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, seed=seed)
    return engine, model, module, optimizer, train_loader


def train(engine, module, loader, k=1, **kw):
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            assert len(batch[0]) <= engine.config.physical_batch_size
            engine.backward(per_row_loss(module, batch, k, **kw))
            engine.step()


def first_nonempty_batch(engine, loader):
    """The first physical batch with 2+ examples, and the live generator (closing it would discard the batch)."""
    batches = engine.physical_batches(loader)
    for batch in batches:
        if len(batch[0]) >= 2:
            return batch, batches
        engine.backward(per_row_loss(engine.module, batch, engine.config.noise_multiplicity))
        engine.step()
    raise AssertionError("no batch with 2+ examples")


@pytest.mark.parametrize(
    ("k", "embed_per_example", "mode"),
    [(1, False, "hooks"), (3, False, "hooks"), (3, True, "hooks"), (2, False, "functorch")],
)
def test_per_example_gradients_match_a_loop(k, embed_per_example, mode):
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    cfg = config(noise_multiplier=0.0, max_grad_norm=1e6, noise_multiplicity=k, grad_sample_mode=mode)
    engine, _, module, optimizer, loader = private(cfg, model)
    batch, _batches = first_nonempty_batch(engine, loader)
    engine.backward(per_row_loss(module, batch, k, embed_per_example=embed_per_example))
    optimizer.clip_and_accumulate()  # the mixin reduces K rows per example here, then Opacus clips
    got = [p.grad_sample for p in optimizer.params]

    x, y, t = rows_of(batch, k, embed_per_example=embed_per_example)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    n = len(batch[0])
    for i in range(n):
        rows = slice(i * k, (i + 1) * k)
        yi = y[i : i + 1] if embed_per_example else y[rows]
        loss = ((reference(x[rows], yi) - t[rows]) ** 2).mean(dim=1).mean()  # the example's mean-over-K loss
        grads = torch.autograd.grad(loss, ref_params)
        for g_engine, g_loop in zip(got, grads, strict=True):
            assert g_engine.shape[0] == n
            torch.testing.assert_close(g_engine[i], g_loop, atol=1e-5, rtol=1e-5)


def test_clipping_bounds_every_example():
    """Hooks mode: the per-example gradients clipped to C sum to the optimizer's clipped sum; book-keeping mode
    (no per-sample weight gradients) gives the same clipped sum on the same batch."""
    c = 0.05
    summed = {}
    for mode in ("hooks", "bookkeeping"):
        torch.manual_seed(0)
        cfg = config(noise_multiplier=0.0, max_grad_norm=c, noise_multiplicity=2, grad_sample_mode=mode)
        engine, _, module, optimizer, loader = private(cfg)
        batch, _batches = first_nonempty_batch(engine, loader)
        engine.backward(per_row_loss(module, batch, 2))
        optimizer.clip_and_accumulate()
        summed[mode] = torch.cat([p.summed_grad.flatten() for p in optimizer.params])
        if mode == "hooks":
            per_example = torch.cat([p.grad_sample.flatten(1) for p in optimizer.params], dim=1)
            norms = per_example.norm(dim=1)
            assert (norms > c).any()  # clipping is active
            clipped = per_example * (c / (norms + 1e-6)).clamp(max=1.0)[:, None]
            assert (clipped.norm(dim=1) <= c + 1e-6).all()
            torch.testing.assert_close(summed[mode], clipped.sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(summed["bookkeeping"], summed["hooks"], atol=1e-6, rtol=1e-5)


def test_frozen_parameters_unchanged_trained_ones_change():
    torch.manual_seed(0)
    cfg = config(
        target_epsilon=8.0, noise_multiplier=None, max_physical_batch_size=2, max_steps=4, noise_multiplicity=2
    )
    engine, model, module, _, loader = private(cfg, opt_cls=torch.optim.AdamW, lr=1e-2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(engine, module, loader, k=2)
    assert engine.steps == 4
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_sample_rate_and_epsilon_match_an_independent_accountant():
    torch.manual_seed(0)
    n = 50  # not a multiple of the batch: Opacus' 1 / len(loader) would give 1/7, not 8/50
    cfg = config(target_epsilon=50.0, noise_multiplier=0.8, accountant="prv", expected_batch_size=8, max_steps=4)
    engine, _, module, optimizer, loader = private(cfg, n=n)
    assert engine.sample_rate == 8 / 50 == loader.sample_rate
    assert optimizer.expected_batch_size == 8
    train(engine, module, loader)
    independent = PRVAccountant()
    for _ in range(4):
        independent.step(noise_multiplier=engine.noise_multiplier, sample_rate=8 / 50)
    summary = engine.summary()
    assert summary["steps"] == 4 and summary["private"] is True
    assert summary["epsilon"] == pytest.approx(independent.get_epsilon(delta=summary["delta"]), rel=1e-9)
    assert 0 < summary["epsilon"] <= 50.0
    assert summary["sample_rate"] == 8 / 50 and summary["dataset_size"] == n
    expected_keys = {
        "private", "epsilon", "target_epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm",
        "sample_rate", "expected_batch_size", "steps", "epochs", "dataset_size", "noise_multiplicity", "dp_library",
        "world_size", "grad_sample_mode",
    }  # fmt: skip
    assert expected_keys <= set(summary)
    json.dumps(summary)


def test_resume_gives_the_same_epsilon_and_steps():
    cfg = config(noise_multiplier=1.0, max_steps=6)
    torch.manual_seed(0)
    engine, _, module, _, loader = private(cfg)
    train(engine, module, loader)

    torch.manual_seed(0)
    first, _, module1, _, loader1 = private(cfg)
    stop = False
    while not stop:
        for batch in first.physical_batches(loader1):
            first.backward(per_row_loss(module1, batch, 1))
            if first.step() and first.steps == 3:
                stop = True
                break
    state = json.loads(json.dumps(first.state_dict()))

    second, _, module2, _, loader2 = private(cfg)
    second.load_state_dict(state)
    assert second.steps == 3
    train(second, module2, loader2)
    assert second.steps == engine.steps == 6
    assert second.epsilon == engine.epsilon


@pytest.mark.parametrize(
    ("change", "n"),
    [({"noise_multiplier": 1.1}, N), ({"expected_batch_size": 8}, N), ({}, N + 1)],
    ids=["sigma", "sample_rate", "dataset_size"],
)
def test_load_refuses_a_different_run(change, n):
    state = DPEngine(config=config(), dataset_size=N).state_dict()
    other = DPEngine(config=config(**change), dataset_size=n)
    with pytest.raises(UserInputError):
        other.load_state_dict(state)


def test_budget_guard_stops_before_exceeding_the_target():
    q = 6 / N
    target = epsilon_after([(1.0, q, 5)], accountant="rdp", delta=default_delta(N)) + 1e-9
    cfg = config(target_epsilon=target, noise_multiplier=1.0, max_steps=None)  # no plan: train until the budget
    engine, _, module, _, loader = private(cfg)
    assert not engine.budget_exhausted
    history_before = list(engine.accountant.history)
    assert not would_exceed(
        engine.accountant, noise_multiplier=1.0, sample_rate=q, delta=engine.delta, target_epsilon=target
    )
    assert engine.accountant.history == history_before  # computed on a copy
    train(engine, module, loader)
    assert engine.steps == 5
    assert engine.epsilon <= target
    assert engine.budget_exhausted
    assert would_exceed(
        engine.accountant, noise_multiplier=1.0, sample_rate=q, delta=engine.delta, target_epsilon=target
    )
    budget = EpsilonBudget(
        accountant="rdp", noise_multiplier=1.0, sample_rate=q, delta=engine.delta, target_epsilon=target
    )
    assert budget.max_steps() == 5


@pytest.mark.parametrize(
    ("kw", "n", "flag"),
    [
        ({"target_epsilon": 0.0, "noise_multiplier": None}, 100, "`target_epsilon`"),
        ({"target_epsilon": -1.0}, 100, "`target_epsilon`"),
        ({"delta": 0.0}, 100, "`delta`"),
        ({"delta": 0.01}, 100, "`delta`"),
        ({"max_grad_norm": 0.0}, 100, "`max_grad_norm`"),
        ({"noise_multiplier": -0.5}, 100, "`noise_multiplier`"),
        ({"noise_multiplier": 0.0, "target_epsilon": 10.0}, 100, "`noise_multiplier`"),
        ({"noise_multiplier": 0.3, "target_epsilon": 1.0, "max_steps": 200}, 100, "`noise_multiplier`"),
        ({"max_physical_batch_size": 7}, 100, "`max_physical_batch_size`"),
        ({}, 5, "`expected_batch_size`"),
        ({"accountant": "moments"}, 100, "`accountant`"),
        ({"grad_sample_mode": "ew"}, 100, "`grad_sample_mode`"),
        ({"noise_multiplicity": 0}, 100, "`noise_multiplicity`"),
        ({"grad_sample_mode": "ghost", "noise_multiplicity": 2}, 100, "`grad_sample_mode`"),
        ({"max_steps": None}, 100, "`epochs`"),
        ({"max_steps": 0}, 100, "`max_steps`"),
        ({"noise_multiplier": None, "target_epsilon": None}, 100, "`target_epsilon`"),
    ],
)
def test_validate_rejects_bad_input(kw, n, flag):
    with pytest.raises(UserInputError) as err:
        config(**kw).validate(dataset_size=n)
    assert flag in str(err.value)
    assert "\n" not in str(err.value)


def test_default_delta_is_below_one_over_n():
    assert default_delta(100) == 1e-5
    assert default_delta(60_000) == pytest.approx(1e-6)
    assert default_delta(50_000) == pytest.approx(1e-6)
    for n in (10, 999, 123_456):
        assert default_delta(n) < 1 / n


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def _toy_with(extra: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), extra)


@pytest.mark.parametrize(
    ("extra", "name"), [(nn.BatchNorm1d(3), "'1'"), (Custom(), "'1'"), (nn.LSTM(3, 3), "'1'")], ids=str
)
def test_unsupported_trainable_module_is_refused_by_name(extra, name):
    model = _toy_with(extra)
    engine = DPEngine(config=config(), dataset_size=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserInputError, match=name):
        engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(dataset(), batch_size=6))


def test_frozen_unsupported_modules_are_fine_and_all_frozen_is_refused():
    model = _toy_with(nn.BatchNorm1d(3).eval())
    model[1].requires_grad_(False)
    engine = DPEngine(config=config(), dataset_size=N)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(dataset(), batch_size=6))

    frozen = Toy().requires_grad_(False)
    engine = DPEngine(config=config(), dataset_size=N)
    with pytest.raises(UserInputError, match="requires grad"):
        engine.make_private(
            module=frozen,
            optimizer=torch.optim.SGD(frozen.parameters(), lr=0.1),
            data_loader=DataLoader(dataset(), batch_size=6),
        )


def test_loss_shape_is_checked():
    engine, _, module, _, loader = private(config(noise_multiplicity=2))
    batch, _batches = first_nonempty_batch(engine, loader)
    with pytest.raises(ValueError, match="one value per row"):
        engine.backward(per_row_loss(module, batch, 2).mean())
    with pytest.raises(ValueError, match="rows"):
        engine.backward(per_row_loss(module, batch, 1))


def test_ghost_clipping_matches_hooks_without_noise():
    torch.manual_seed(0)
    base = Toy()
    finals = []
    for mode in ("hooks", "ghost"):
        cfg = config(noise_multiplier=0.0, max_grad_norm=0.1, grad_sample_mode=mode, max_physical_batch_size=2)
        engine, model, module, _, loader = private(cfg, copy.deepcopy(base), lr=1.0, seed=3)
        train(engine, module, loader)
        finals.append([p.detach().clone() for p in model.parameters()])
    for hooks_p, ghost_p in zip(*finals, strict=True):
        torch.testing.assert_close(hooks_p, ghost_p, atol=1e-5, rtol=1e-4)
    assert not all(torch.equal(a, b) for a, b in zip(finals[0], [p for p in base.parameters()], strict=True))


def test_empty_poisson_batches_count_as_steps():
    cfg = config(expected_batch_size=1, max_steps=12, noise_multiplicity=2)  # q = 1/24: most batches are empty
    engine, _, module, _, loader = private(cfg)
    sizes = []
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            sizes.append(len(batch[0]))
            engine.backward(per_row_loss(module, batch, 2))
            engine.step()
    assert engine.steps == 12 and 0 in sizes
    assert engine.accountant.history == [(1.0, 1 / N, 12)]


def test_disable_dp_runs_the_same_loop_and_matches_one_big_batch():
    torch.manual_seed(0)
    base = Toy()
    cfg = config(disable_dp=True, max_physical_batch_size=4, max_steps=1, noise_multiplicity=2)
    engine, model, module, _, loader = private(cfg, copy.deepcopy(base), lr=0.5)
    seen = []
    for batch in engine.physical_batches(loader):
        seen.append(batch)
        engine.backward(per_row_loss(module, batch, 2))
        assert engine.step() == (len(seen) == 2)
    assert engine.steps == 1 and engine.finished
    # the mean loss over all rows of the logical batch, each physical batch with its own perturbations
    loss = sum(per_row_loss(base, batch, 2).sum() for batch in seen) / (2 * cfg.expected_batch_size)
    params = [p for p in base.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p0, g, p1 in zip(params, grads, trained, strict=True):
        torch.testing.assert_close(p1, p0 - 0.5 * g, atol=1e-6, rtol=1e-5)
    summary = engine.summary()
    assert summary["private"] is False and summary["epsilon"] is None


def test_reduce_rows_keeps_per_example_tensors():
    g = torch.arange(12.0).reshape(6, 2)
    torch.testing.assert_close(reduce_rows(g, multiplicity=3, num_examples=2), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    assert reduce_rows(g, multiplicity=3, num_examples=6) is g
    with pytest.raises(ValueError):
        reduce_rows(g, multiplicity=4, num_examples=2)
    assert math.isinf(epsilon_after([(0.0, 0.1, 3)], accountant="rdp", delta=1e-5))


def test_leaving_mid_logical_batch_discards_its_partial_sum():
    engine, _, module, optimizer, loader = private(config(max_physical_batch_size=1, max_steps=2))
    for batch in engine.physical_batches(loader):
        engine.backward(per_row_loss(module, batch, 1))
        if not engine.step():  # accumulated, logical batch still open
            break
    assert all(p.summed_grad is None for p in optimizer.params)
    assert optimizer._step_skip_queue == [] and engine.steps == 0
    train(engine, module, loader)
    assert engine.steps == 2


def test_loop_misuse_and_wrong_loader_are_reported():
    engine, _, module, _, loader = private(config())
    batches = engine.physical_batches(loader)
    next(batches)
    with pytest.raises(RuntimeError, match="backward"):
        engine.step()
    with pytest.raises(RuntimeError, match="backward"):
        next(batches)
    engine = DPEngine(config=config(), dataset_size=N)
    model = Toy()
    with pytest.raises(UserInputError, match="`expected_batch_size`"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.head.parameters(), lr=0.1),
                            data_loader=DataLoader(dataset(), batch_size=2))  # fmt: skip


@pytest.mark.parametrize("k", [1, 3])
def test_grad_sample_module_and_optimizer_match_stock_opacus(k):
    """DPGradSampleModule + EngineDPOptimizer (no zero-fill copy, K folded into the samplers, scale_grad once) take
    the same clipped, noised step as Opacus' GradSampleModule + DPOptimizer (+ the K-row mean before clipping)."""
    from stock_opacus import stock_opacus_backward

    from dp_diffusers.privacy.grad_sample import DPGradSampleModule
    from dp_diffusers.privacy.optimizers import EngineDPOptimizer, MultiplicityDPOptimizer

    torch.manual_seed(0)
    ours_model = Toy()
    stock_model = copy.deepcopy(ours_model)
    batch = dataset(5, seed=3).tensors
    x, y, t = rows_of(batch, k)
    # C between the examples' gradient norms (about 4 to 10): some are clipped, some not, so a wrongly scaled
    # per-sample gradient changes the step.
    kw = dict(noise_multiplier=0.01, max_grad_norm=5.0, expected_batch_size=5, loss_reduction="mean")

    ours = DPGradSampleModule(ours_model, noise_multiplicity=k, batch_first=True, loss_reduction="mean")
    opt_cls = MultiplicityDPOptimizer if k > 1 else EngineDPOptimizer
    extra = {"noise_multiplicity": k} if k > 1 else {}
    params = [p for p in ours_model.parameters() if p.requires_grad]
    ours_opt = opt_cls(torch.optim.SGD(params, lr=0.1), generator=torch.Generator().manual_seed(1), **kw, **extra)
    ours.set_num_examples(5)
    if k > 1:
        ours_opt.set_num_examples(5)
    ((ours(x, y) - t) ** 2).mean(dim=1).mean().backward()
    rows = {name: p.grad_sample.shape[0] for name, p in ours_model.named_parameters() if p.requires_grad}
    if k > 1:  # folded in the sampler (Linear, LayerNorm, Embedding) vs reduced by the optimizer (Conv, GroupNorm)
        assert rows["head.weight"] == rows["ln.weight"] == rows["embed.weight"] == 5
        assert rows["conv.weight"] == rows["gn.weight"] == 5 * k
    ours_opt.step()

    stock_opacus_backward(stock_model, x, y, t, multiplicity=k, noise_seed=1, **kw).step()

    for (name, a), b in zip(ours_model.named_parameters(), stock_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(ours_model.parameters(), Toy().parameters(), strict=True))
