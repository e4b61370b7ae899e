"""Book-keeping clipping (grad_sample_mode="bookkeeping"): exact against stock Opacus, loops, and hooks mode."""

from __future__ import annotations

import copy

import pytest
import torch
from stock_opacus import stock_opacus_backward
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_diffusers.privacy import DPEngine, PrivacyConfig, repeat_rows
from dp_diffusers.privacy.bookkeeping import linear_weight_clipped_sum, linear_weight_ghost_norms2
from dp_diffusers.privacy.grad_sample import DPGradSampleModule
from dp_diffusers.privacy.optimizers import (
    EngineDPOptimizer,
    MultiplicityDPOptimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SeqToy(nn.Module):
    """Linear layers on token sequences, as in a transformer block: one whose per-sample gradient is cheaper than
    its ghost norm (``inp``: 16 tokens, 2 -> 24: materialised), one where the ghost norm is cheaper (``mix``: 4 tokens,
    96 -> 96: book-keeping), one used twice in the forward pass (``tied``: must fall back to materialised per-sample
    gradients), a 2-D one (``head``: book-keeping), plus an Embedding, a LayerNorm and a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 24)
        self.mix = nn.Linear(96, 96)
        self.embed = nn.Embedding(5, 96)
        self.ln = nn.LayerNorm(96)
        self.frozen = nn.Linear(96, 96)
        self.tied = nn.Linear(96, 96)
        self.head = nn.Linear(96, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x, y):
        tokens = x.flatten(2).transpose(1, 2)  # [B, 2, 4, 4] -> [B, 16, 2]
        h = self.inp(tokens).reshape(x.shape[0], 4, 96)  # [B, 4, 96]
        h = self.ln(torch.tanh(self.mix(h) + self.embed(y)[:, None]))
        h = self.tied(torch.tanh(self.tied(self.frozen(h))))
        return self.head(h.mean(dim=1))


def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g), torch.randn(n, 3, generator=g)
    )


def rows(batch, k: int, seed: int = 7):
    x, y, t = repeat_rows(tuple(batch), k)
    return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)), y, t


def loss_rows(module, batch, k: int):
    x, y, t = rows(batch, k)
    return ((module(x, y) - t) ** 2).mean(dim=1)


@pytest.mark.parametrize(("t", "d_in", "d_out"), [(16, 2, 24), (4, 96, 96), (1, 96, 3)])
def test_norms_and_clipped_sum_equal_materialised_per_sample_gradients(t, d_in, d_out):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, t, d_in, generator=g), torch.randn(5, t, d_out, generator=g)
    per_sample = torch.einsum("nto,nti->noi", b, a)
    expected = per_sample.square().sum(dim=(1, 2))
    torch.testing.assert_close(linear_weight_ghost_norms2(a, b), expected, rtol=1e-4, atol=1e-4)
    c = torch.rand(5, generator=g)
    torch.testing.assert_close(linear_weight_clipped_sum(a, b, c), torch.einsum("n,noi->oi", c, per_sample))


@pytest.mark.parametrize("k", [1, 3])
def test_bookkeeping_step_matches_stock_opacus(k):
    """The clipped, noised step equals stock Opacus GradSampleModule + DPOptimizer (with the K-row mean by hand),
    and no [B, out, in] per-sample gradient is stored for a book-keeping weight."""
    torch.manual_seed(0)
    ours_model = SeqToy()
    stock_model = copy.deepcopy(ours_model)
    x, y, t = rows(data(5, seed=3).tensors, k)
    # C between the examples' gradient norms: some are clipped, some not, so a wrong norm changes the step.
    kw = dict(noise_multiplier=0.01, max_grad_norm=3.0, expected_batch_size=5, loss_reduction="mean")

    ours = DPGradSampleModule(
        ours_model, noise_multiplicity=k, bookkeeping=True, batch_first=True, loss_reduction="mean"
    )
    params = [p for p in ours_model.parameters() if p.requires_grad]
    opt_cls, extra = (MultiplicityDPOptimizer, {"noise_multiplicity": k}) if k > 1 else (EngineDPOptimizer, {})
    ours_opt = opt_cls(torch.optim.SGD(params, lr=0.1), generator=torch.Generator().manual_seed(1), **kw, **extra)
    ours.set_num_examples(5)
    if k > 1:
        ours_opt.set_num_examples(5)
    ((ours(x, y) - t) ** 2).mean(dim=1).mean().backward()
    shapes = {name: tuple(p.grad_sample.shape) for name, p in ours_model.named_parameters() if p.requires_grad}
    bookkept = ("mix.weight", "head.weight") if k == 1 else ("mix.weight",)  # K folds into head's positions
    for name in bookkept:
        assert shapes[name] == (5,), (name, shapes[name])  # per-example squared norms only
    assert shapes["inp.weight"] == (5, 24, 2)  # 16 positions: the per-sample gradient is cheaper and smaller
    assert shapes["tied.weight"] == (5, 96, 96)  # used twice: materialised
    assert shapes["mix.bias"] == (5, 96)
    norms = {name: p.grad_sample.clone() for name, p in ours_model.named_parameters() if p.requires_grad}
    ours_opt.step()

    stock_opt = stock_opacus_backward(stock_model, x, y, t, multiplicity=k, noise_seed=1, **kw)
    for name, p in stock_model.named_parameters():
        if name in bookkept:
            torch.testing.assert_close(norms[name], p.grad_sample.square().sum(dim=(1, 2)), rtol=1e-4, atol=1e-6)
    clip_factors = 3.0 / (torch.stack([g.reshape(5, -1).norm(dim=1) for g in stock_opt.grad_samples]).norm(dim=0))
    assert (clip_factors < 1).any() and (clip_factors > 1).any()  # C really sits between the examples' norms
    stock_opt.step()

    for (name, a), b in zip(ours_model.named_parameters(), stock_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not any(hasattr(p, "_bookkeeping_inputs") for p in params)  # inputs released after the step


@pytest.mark.parametrize("k", [1, 2])
def test_engine_bookkeeping_trains_like_hooks(k):
    """Same data, seeds and noise: book-keeping and hooks mode take the same steps through the engine, with
    physical batches accumulated into logical ones, and the frozen layer stays bit-identical."""
    torch.manual_seed(0)
    base = SeqToy()
    finals = []
    for mode in ("hooks", "bookkeeping"):
        model = copy.deepcopy(base)
        cfg = PrivacyConfig(
            target_epsilon=None, noise_multiplier=0.5, max_grad_norm=0.5, accountant="rdp", expected_batch_size=6,
            max_physical_batch_size=2, max_steps=3, epochs=None, noise_multiplicity=k, grad_sample_mode=mode,
        )  # fmt: skip
        engine = DPEngine(config=cfg, dataset_size=24)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loader = DataLoader(data(24), batch_size=6)
        module, _, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, seed=3, noise_generator=torch.Generator().manual_seed(5)
        )
        while not engine.finished:
            for batch in engine.physical_batches(loader):
                engine.backward(loss_rows(module, batch, k))
                engine.step()
        assert engine.steps == 3
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, hooks_p in finals[0].items():
        torch.testing.assert_close(finals[1][name], hooks_p, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(finals[1]["frozen.weight"], base.frozen.weight)
    assert not torch.equal(finals[1]["mix.weight"], base.mix.weight)


@pytest.mark.parametrize("bookkeeping", [False, True])
def test_autograd_computes_no_summed_gradient_for_trained_parameters(bookkeeping):
    """DPGradSampleModule keeps trained parameters out of the autograd graph while their module runs on an input
    that requires grad (Opacus never reads that p.grad); the first trained layer (input needs no grad) and the
    embedding (integer input) keep theirs. requires_grad is back after the forward, even when it raises."""
    model = SeqToy()
    module = DPGradSampleModule(model, bookkeeping=bookkeeping, batch_first=True, loss_reduction="mean")
    x, y, t = rows(data(4).tensors, 1)
    ((module(x, y) - t) ** 2).mean(dim=1).mean().backward()
    computed = {name for name, p in model.named_parameters() if p.grad is not None}
    assert computed == {"inp.weight", "inp.bias", "embed.weight"}
    assert all(p.grad_sample is not None for p in model.parameters() if p.requires_grad)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in model.named_parameters()} - {"frozen.weight", "frozen.bias"}

    def boom(*_):
        assert not model.mix.weight.requires_grad  # switched off during the forward
        raise RuntimeError("boom")

    model.mix.forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        module(x, y)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trained


def test_bookkeeping_under_bf16_autocast_matches_hooks():
    """--mixed_precision bf16 (the only mixed precision allowed under DP): bf16 activations and backprops reach the
    ghost norms and the clipped-sum GEMM; the fp32 step equals hooks mode's within bf16 rounding."""
    torch.manual_seed(0)
    base = SeqToy()
    x, y, t = rows(data(6).tensors, 1)
    finals = []
    for bookkeeping in (False, True):
        model = copy.deepcopy(base)
        module = DPGradSampleModule(model, bookkeeping=bookkeeping, batch_first=True, loss_reduction="mean")
        cls = EngineDPOptimizer  # one optimizer: it clips book-keeping weights where the hooks stored them
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = cls(
            torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=3.0, expected_batch_size=6,
            loss_reduction="mean",
        )  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, y)
        ((out.float() - t) ** 2).mean(dim=1).mean().backward()
        if bookkeeping:
            # per-example squared norms, computed in float32 from the bf16 activations and backprops
            assert model.mix.weight.grad_sample.shape == (6,) and model.mix.weight.grad_sample.dtype == torch.float32
        optimizer.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, hooks_p in finals[0].items():
        update = (hooks_p - base.state_dict()[name]).abs().max()
        assert (finals[1][name] - hooks_p).abs().max() <= 0.01 * update + 1e-6, name
    assert not torch.equal(finals[1]["mix.weight"], base.mix.weight)


def test_a_module_called_inside_its_own_forward_gets_its_parameters_back():
    class Recursive(nn.Linear):
        def forward(self, x, depth: int = 1):
            y = super().forward(x)
            return self(y, depth=depth - 1) if depth > 0 else y

    model = nn.Sequential(nn.Linear(3, 3), Recursive(3, 3))
    module = DPGradSampleModule(model, batch_first=True, loss_reduction="mean")
    module(torch.randn(4, 3)).sum().backward()
    assert all(p.requires_grad for p in model.parameters())
    assert model[1].weight.grad_sample.shape == (4, 3, 3)
