"""``DPEngine``: DP-SGD for any ``nn.Module``, loss and map-style dataset, built from Opacus' parts.

The engine composes Opacus pieces instead of calling ``PrivacyEngine.make_private``, because ``make_private`` derives
the sample rate from ``1 / len(data_loader)`` and feeds it to both the sampler and the accountant; that equals the
intended ``B / N`` only when N is a multiple of B. The parts used: ``prepare_module`` (GradSampleModule: hooks,
functorch or ghost), the ``DPOptimizer`` family (clipping, noise, distributed reduction), ``DPDataLoader`` (Poisson
sampling), ``BatchSplittingSampler`` (BatchMemoryManager), an Opacus accountant and its optimizer hook, and
``DifferentiallyPrivateDistributedDataParallel``. Hand-written: noise multiplicity (``multiplicity.py``), book-keeping
clipping of linear weights (``bookkeeping.py``; the default ``grad_sample_mode``), exact shortcuts in the hooks and
the optimizer (``grad_sample.py``, ``optimizers.py``: Opacus 1.6 copies every per-sample gradient once more than
needed, lets autograd compute summed gradients it then discards, and scales gradients in O(tensors^2)), per-module
compatibility errors (``compatibility.py``), deadlock-free sharding (``sampling.py``) and the budget guard
(``accounting.py``).

Loop::

    engine = DPEngine(config=privacy_config, dataset_size=len(train_set))
    module, optimizer, loader = engine.make_private(module=model, optimizer=opt, data_loader=full_loader)
    while not engine.finished:
        for batch in engine.physical_batches(loader):
            engine.backward(loss_fn(module, batch))  # one loss per row: shape [B * K]
            if engine.step():                        # True once per logical batch
                lr_scheduler.step()
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator

import opacus
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleModule, prepare_module
from opacus.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import UserInputError
from .accounting import (
    EpsilonBudget,
    calibrate_noise,
    compute_sample_rate,
    epsilon_after,
    history_steps,
    make_accountant,
)
from .bookkeeping import BOOKKEEPING_INPUTS
from .compatibility import check_trainable_modules
from .config import PrivacyConfig
from .grad_sample import DPGradSampleModule
from .optimizers import engine_optimizer_class
from .randomness import CALLER, CSPRNG, OS_ENTROPY, RandomnessSource, noise_source_description
from .sampling import StepSignals, batch_length, poisson_loader, shuffled_loader, split_physical

STATE_FORMAT = 1


class DPEngine:
    """Orchestrates DP-SGD: Poisson batches, per-example clipping, noise once per logical step, accounting.

    Keyword-only API. ``DPEngine(config=..., dataset_size=N)`` validates the config and calibrates the noise;
    :meth:`make_private` wraps model, optimizer and data; the loop is :meth:`physical_batches`, :meth:`backward`,
    :meth:`step`. With ``config.disable_dp`` the same loop trains without clipping, noise or accounting.
    """

    def __init__(self, *, config: PrivacyConfig, dataset_size: int):
        config.validate(dataset_size=dataset_size)
        self.config = config
        self.dataset_size = dataset_size
        self._sample_rate = compute_sample_rate(
            expected_batch_size=config.expected_batch_size, dataset_size=dataset_size
        )
        self._planned_steps = config.planned_steps(dataset_size=dataset_size)
        self._delta = config.resolve_delta(dataset_size=dataset_size)
        self._noise_multiplier: float | None = None
        self.accountant = None
        self._budget: EpsilonBudget | None = None
        if self.private:
            if config.accountant == "gdp":
                warnings.warn(
                    "The gdp accountant is experimental and can underestimate epsilon; prefer prv.", stacklevel=2
                )
            if config.noise_multiplier is not None:
                self._noise_multiplier = float(config.noise_multiplier)
            else:
                self._noise_multiplier = calibrate_noise(
                    target_epsilon=config.target_epsilon,
                    delta=self._delta,
                    sample_rate=self._sample_rate,
                    steps=self._planned_steps,
                    accountant=config.accountant,
                )
            self.accountant = make_accountant(config.accountant)
            if config.target_epsilon is not None:
                self._budget = EpsilonBudget(
                    accountant=config.accountant,
                    noise_multiplier=self._noise_multiplier,
                    sample_rate=self._sample_rate,
                    delta=self._delta,
                    target_epsilon=config.target_epsilon,
                    hint_steps=self._planned_steps,
                )
        self._steps = 0
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._raw_module: nn.Module | None = None
        self._train_loader: DataLoader | None = None
        self._world_size = 1
        self._rank = 0
        self._local_batch_size = config.expected_batch_size
        self._signals = StepSignals()
        self._epoch = 0
        self._in_logical_batch = False
        self._awaiting_step = False
        self._backward_done = False
        self._batch_examples: int | None = None
        self._epsilon_cache: tuple[int, float] | None = None
        self._randomness: dict[str, str | None] = {"noise": None, "sampling": None}

    # ------------------------------------------------------------------ properties

    @property
    def private(self) -> bool:
        return not self.config.disable_dp

    @property
    def steps(self) -> int:
        """Logical steps taken (including those restored by :meth:`load_state_dict`)."""
        return self._steps

    @property
    def noise_multiplier(self) -> float | None:
        return self._noise_multiplier

    @property
    def sample_rate(self) -> float:
        """Poisson sample rate ``expected_batch_size / dataset_size`` (what the sampler and the accountant use)."""
        return self._sample_rate

    @property
    def noise_to_signal(self) -> float | None:
        """sigma / B: the standard deviation of one step's noise on the averaged clipped gradient, in units of the
        clip bound C (which bounds any one example's signal). None without DP."""
        if self._noise_multiplier is None:
            return None
        return self._noise_multiplier / self.config.expected_batch_size

    @property
    def planned_steps(self) -> int | None:
        return self._planned_steps

    @property
    def delta(self) -> float | None:
        return self._delta

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def unwrapped_module(self) -> nn.Module | None:
        """The model given to :meth:`make_private` (trained in place; save this one, without wrapper prefixes)."""
        return self._raw_module

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent so far at :attr:`delta` (None without DP)."""
        if not self.private:
            return None
        if self._epsilon_cache is None or self._epsilon_cache[0] != self._steps:
            eps = epsilon_after(self.accountant.history, accountant=self.config.accountant, delta=self._delta)
            self._epsilon_cache = (self._steps, eps)
        return self._epsilon_cache[1]

    @property
    def budget_exhausted(self) -> bool:
        """True if one more logical step would push epsilon over ``target_epsilon``: stop *before* that step."""
        if self._budget is None:
            return False
        return self._budget.exceeds(self._steps + 1)

    @property
    def finished(self) -> bool:
        """The planned steps are done or the budget is exhausted; :meth:`physical_batches` then yields nothing."""
        planned_done = self._planned_steps is not None and self._steps >= self._planned_steps
        return planned_done or self.budget_exhausted

    # ------------------------------------------------------------------ setup

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        distributed: bool | None = None,
        noise_generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap model, optimizer and data for (DP-)SGD; returns ``(module, optimizer, train_loader)``.

        Args:
            module: the model, not yet wrapped (no DistributedDataParallel, no ``accelerator.prepare``), in train mode
                and on its device. Its trainable parameters are the ones trained privately.
            optimizer: a plain optimizer over (some of) ``module``'s parameters.
            data_loader: a loader over the *full, un-sharded* training set with ``batch_size`` = the logical batch;
                only its dataset and settings (collate_fn, workers, pinning) are kept: the engine replaces its
                sampling by Poisson sampling at rate ``B / N`` (without DP: a reshuffling loader, incomplete
                batches dropped).
            distributed: spread the logical batch over the ``torch.distributed`` processes (noise added once, on
                rank 0). Default: True when a process group with more than one process is initialised.
            noise_generator: source of the DP noise, built by the caller (recorded as such in :meth:`summary`).
            seed: make the noise and the Poisson sampling reproducible from this seed (each rank adds its rank):
                for tests and debugging only. Anyone who knows the seed can replay the run, so the release is NOT
                differentially private, and :meth:`summary` says so.

        By default the noise and the sampling masks come from generators seeded with the operating system's entropy
        on every process, never stored (``randomness.py``); torch's global generator (what ``--seed`` sets) is not
        used for either.
        """
        if self.module is not None:
            raise RuntimeError("make_private was already called on this engine; create a new DPEngine.")
        if isinstance(module, (DDP, AbstractGradSampleModule)):
            raise UserInputError(
                f"make_private got an already wrapped model ({type(module).__name__}): pass the bare model; the "
                "engine wraps it (with DP, do not accelerator.prepare the model, optimizer or data loader)."
            )
        distributed = self._resolve_distributed(distributed)
        if distributed:
            self._world_size = torch.distributed.get_world_size()
            self._rank = torch.distributed.get_rank()
        self._check_data_loader(data_loader)
        self._check_optimizer(module, optimizer)
        self._raw_module = module
        if self.private:
            source = RandomnessSource() if seed is None else RandomnessSource.seeded(seed)
            device = next(p.device for group in optimizer.param_groups for p in group["params"])
            sampling_generator = source.generator(offset=1 + self._rank)  # the sampler draws on the CPU
            self._randomness = {"sampling": source.generator_kind(), "noise": CALLER}
            if noise_generator is None:
                noise_generator = source.generator(device=device)
                self._randomness["noise"] = source.generator_kind(device)
            self._make_private_dp(module, optimizer, data_loader, distributed, noise_generator, sampling_generator)
        else:
            # Without DP nothing is secret; the shuffle seed must only agree across ranks (torch's global generator,
            # seeded alike on every rank by set_seed, as before).
            shuffle_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
            self._make_plain(module, optimizer, data_loader, distributed, shuffle_seed)
        return self.module, self.optimizer, self._train_loader

    def _resolve_distributed(self, distributed: bool | None) -> bool:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed is None:
            return initialised and torch.distributed.get_world_size() > 1
        if distributed and not initialised:
            raise UserInputError(
                "distributed=True needs an initialised torch.distributed process group: launch with torchrun or "
                "accelerate launch (and create the Accelerator before the engine)."
            )
        return bool(distributed)

    def _check_data_loader(self, data_loader: DataLoader) -> None:
        n = len(data_loader.dataset)
        if n != self.dataset_size:
            raise UserInputError(
                f"The data loader holds {n} examples but the engine was built for dataset_size={self.dataset_size}: "
                "pass the full, un-sharded training set to both."
            )
        if isinstance(data_loader.sampler, DistributedSampler):
            raise UserInputError(
                "The data loader is already sharded (DistributedSampler): pass the full training set loader; the "
                "engine shards it across processes itself (do not accelerator.prepare it)."
            )
        b = self.config.expected_batch_size
        if data_loader.batch_size not in (None, b):
            raise UserInputError(
                f"The data loader's batch_size is {data_loader.batch_size} but the logical batch "
                f"`expected_batch_size` is {b}: build it with batch_size={b} (the engine splits batches into "
                f"physical ones of at most `max_physical_batch_size`)."
            )

    def _check_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, DPOptimizer):
            raise UserInputError("make_private got an Opacus DPOptimizer: pass the plain optimizer.")
        module_params = {id(p) for p in module.parameters()}
        trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if any(id(p) not in module_params for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("The optimizer holds parameters that are not the module's.")
        if not trained:
            raise UserInputError(
                "No parameter of the optimizer requires grad: nothing would be trained (check which layers are "
                "unfrozen before building the optimizer)."
            )

    def _make_private_dp(self, module, optimizer, data_loader, distributed, noise_generator, sampling_generator):
        cfg = self.config
        check_trainable_modules(module, grad_sample_mode=cfg.grad_sample_mode)
        if distributed:
            # Opacus' DPDDP only broadcasts rank 0's parameters; gradients are all-reduced once per logical step by
            # the Distributed*DPOptimizer, so ranks may split their Poisson batches into different numbers of
            # physical batches without deadlocking (torch DDP would all-reduce after every backward).
            module = DPDDP(module)
        if cfg.grad_sample_mode in ("hooks", "bookkeeping"):
            # Opacus' hooks minus a zero-fill copy, plus the noise-multiplicity fold (grad_sample.py) and, in
            # book-keeping mode, linear weights clipped from their norms and inputs (bookkeeping.py).
            gsm = DPGradSampleModule(
                module,
                noise_multiplicity=cfg.noise_multiplicity,
                bookkeeping=cfg.grad_sample_mode == "bookkeeping",
                batch_first=True,
                loss_reduction="mean",
            )
        else:
            extra = {"max_grad_norm": cfg.max_grad_norm} if cfg.grad_sample_mode == "ghost" else {}
            gsm = prepare_module(
                module, grad_sample_mode=cfg.grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
            )
        gsm.forbid_grad_accumulation()
        optimizer_class, kwargs = self._optimizer_class(distributed)
        dp_optimizer = optimizer_class(
            optimizer,
            noise_multiplier=self._noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            # Opacus divides by expected_batch_size per rank, then averages over ranks: B / W * W = B examples.
            expected_batch_size=cfg.expected_batch_size / self._world_size,
            loss_reduction="mean",
            generator=noise_generator,
            # Opacus' floating-point-safe Gaussian sampling (the noise half of its secure_mode; see randomness.py).
            secure_mode=True,
            **kwargs,
        )
        # The accountant is fed exactly q = B / N at every logical step (Opacus' hook multiplies it by the number of
        # accumulated backward passes, which forbid_grad_accumulation keeps at 1).
        dp_optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self._sample_rate))
        self.module, self.optimizer = gsm, dp_optimizer
        self._train_loader = poisson_loader(
            data_loader,
            sample_rate=self._sample_rate,
            generator=sampling_generator,
            rank=self._rank,
            world_size=self._world_size,
        )

    def _optimizer_class(self, distributed: bool):
        k = self.config.noise_multiplicity
        if self.config.grad_sample_mode == "ghost":
            return (DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping), {}
        return engine_optimizer_class(distributed=distributed, noise_multiplicity=k)

    def _make_plain(self, module, optimizer, data_loader, distributed, seed) -> None:
        b, w = self.config.expected_batch_size, self._world_size
        if b % w:
            raise UserInputError(f"`expected_batch_size` ({b}) must be a multiple of the {w} processes.")
        if self.config.physical_batch_size > b // w:
            raise UserInputError(
                f"`max_physical_batch_size` ({self.config.physical_batch_size}) exceeds the per-process "
                f"batch {b // w}: lower it."
            )
        self._local_batch_size = b // w
        self.module = DDP(module) if distributed else module
        self.optimizer = optimizer
        self._train_loader = shuffled_loader(
            data_loader, batch_size=self._local_batch_size, seed=seed, rank=self._rank, world_size=w
        )

    # ------------------------------------------------------------------ loop

    def physical_batches(self, data_loader: DataLoader) -> Iterator:
        """Yield the physical batches of one pass over ``data_loader`` (the loader :meth:`make_private` returned).

        Stops early, between logical batches, once :attr:`finished` (planned steps done or budget exhausted). Call
        :meth:`backward` and :meth:`step` once per yielded batch. Leaving the loop in the middle of a logical batch
        discards its partial gradients (they must not leak into the next logical step).
        """
        if self.module is None:
            raise RuntimeError("Call make_private before physical_batches.")
        signals = self.optimizer if self.private else self._signals
        if isinstance(getattr(data_loader, "sampler", None), DistributedSampler):
            data_loader.sampler.set_epoch(self._epoch)
        self._epoch += 1
        self._discard_partial()
        batches = iter(
            split_physical(data_loader, max_physical_batch_size=self.config.physical_batch_size, signals=signals)
        )
        completed = False
        try:
            while True:
                if self._awaiting_step:
                    raise RuntimeError("Call engine.backward(...) and engine.step() for every physical batch.")
                if not self._in_logical_batch and self.finished:
                    break
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                self._in_logical_batch = True
                self._awaiting_step = True
                self._backward_done = False
                self._batch_examples = batch_length(batch)
                if isinstance(self.module, DDP) and not self._signals.next_is_last():
                    # Without DP, torch DDP all-reduces after every backward; skip that until the logical batch ends.
                    with self.module.no_sync():
                        yield batch
                else:
                    yield batch
            completed = True
        finally:
            if sys.is_finalizing():  # a generator left open at interpreter exit: nothing left to clean
                pass
            elif not completed or self._in_logical_batch:
                self._discard_partial()
            elif self.private:
                self.optimizer._step_skip_queue.clear()
            else:
                self._signals.clear()

    def _discard_partial(self) -> None:
        """Forget a partially accumulated logical batch and any stale per-sample state (best effort, Opacus'
        internals: its skip queue, summed_grad, grad_sample and the hooks' activation bookkeeping)."""
        self._in_logical_batch = False
        self._awaiting_step = self._backward_done = False
        if self.optimizer is None:
            return
        if self.private:
            opt = self.optimizer
            opt._step_skip_queue.clear()
            opt._is_last_step_skipped = False
            for p in opt.params:
                p.summed_grad = None
                p.grad_sample = None
                for attr in ("_current_grad_sample", BOOKKEEPING_INPUTS):
                    if hasattr(p, attr):
                        delattr(p, attr)
                if hasattr(p, "_forward_counter"):
                    p._forward_counter = 0
            for m in self._raw_module.modules():
                if hasattr(m, "activations"):
                    m.activations = []
                if hasattr(m, "max_batch_len"):
                    del m.max_batch_len
        else:
            self._signals.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def batch_is_empty(self) -> bool:
        """The physical batch just yielded holds no example: an empty Poisson draw (rare at large batches, certain
        over many steps at small ones). Its step still happens, noise only, and is counted: pass ``None`` to
        :meth:`backward` instead of running the model on zero rows (diffusers' attention fails on them)."""
        return self._awaiting_step and self._batch_examples == 0

    def _backward_empty(self) -> None:
        """What a backward pass over zero examples leaves for the optimizer: no per-sample gradient rows (hooks,
        book-keeping, functorch) or a zero summed gradient (ghost), so the step adds the noise alone."""
        if self.private:
            for p in self.optimizer.params:
                if self.config.grad_sample_mode == "ghost":
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        self._backward_done = True

    def backward(self, per_row_loss: torch.Tensor | None) -> None:
        """Back-propagate one physical batch. ``per_row_loss``: one unreduced loss per row, shape ``[B * K]`` with
        K = noise_multiplicity and rows example-major (example i at rows ``i*K .. i*K+K-1``); ``None`` for an empty
        batch (:attr:`batch_is_empty`), whose logical step then adds noise only."""
        if not self._awaiting_step or self._backward_done:
            raise RuntimeError("engine.backward() runs once per batch from engine.physical_batches(), then step().")
        k = self.config.noise_multiplicity
        n = self._batch_examples
        if per_row_loss is None:
            if n != 0:
                raise ValueError("engine.backward(None) is for an empty Poisson batch only (engine.batch_is_empty).")
            self._backward_empty()
            return
        if not isinstance(per_row_loss, torch.Tensor) or per_row_loss.dim() != 1:
            shape = tuple(per_row_loss.shape) if isinstance(per_row_loss, torch.Tensor) else type(per_row_loss)
            raise ValueError(
                f"The loss must be unreduced, one value per row: shape [{n if n is not None else 'B'} * {k}], got "
                f"{shape}. Reduce all other dimensions (e.g. .mean(dim=(1, 2, 3))) but not the batch."
            )
        rows = per_row_loss.shape[0]
        if (n is not None and rows != n * k) or rows % k:
            raise ValueError(
                f"The loss has {rows} rows but the physical batch has {n} examples x noise_multiplicity {k} = "
                f"{None if n is None else n * k}: repeat each example K times, example-major (see repeat_rows)."
            )
        if not self.private:
            (per_row_loss.sum() / (k * self._local_batch_size)).backward()
        elif self.config.grad_sample_mode == "ghost":
            # Opacus' two-pass ghost clipping: per-row norms, then the loss re-weighted by the clipping factors.
            DPTensorFastGradientClipping(self.module, self.optimizer, per_row_loss, "mean").backward()
        else:
            if k > 1:
                self.optimizer.set_num_examples(rows // k)
                if isinstance(self.module, DPGradSampleModule):
                    self.module.set_num_examples(rows // k)
            # GradSampleModule rescales by the row count, so each row's grad_sample is the gradient of its own
            # loss; an empty Poisson batch has no mean, but its (empty) sum back-propagates the same nothing.
            with warnings.catch_warnings():
                # Opacus' hooks on a first layer whose input needs no grad make torch warn once per run; harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (per_row_loss.mean() if rows else per_row_loss.sum()).backward()
        self._backward_done = True

    def step(self) -> bool:
        """Finish a physical batch; on the last one of a logical batch, clip + noise + update. Returns True when a
        logical step was taken (step LR schedulers then), False when the batch was only accumulated."""
        if not self._backward_done:
            raise RuntimeError("engine.step() follows engine.backward() on a batch from engine.physical_batches().")
        if self.private:
            self.optimizer.step()
            taken = not self.optimizer._is_last_step_skipped
            self.optimizer.zero_grad(set_to_none=True)
        else:
            taken = self._signals.pop_is_last()
            if taken:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self._awaiting_step = self._backward_done = False
        if taken:
            self._steps += 1
            self._in_logical_batch = False
        return taken

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume the accounting: history, steps, sigma, q and N (never any randomness)."""
        return {
            "format": STATE_FORMAT,
            "private": self.private,
            "steps": self._steps,
            "noise_multiplier": self._noise_multiplier,
            "sample_rate": self._sample_rate,
            "dataset_size": self.dataset_size,
            "expected_batch_size": self.config.expected_batch_size,
            "max_grad_norm": self.config.max_grad_norm if self.private else None,
            "noise_multiplicity": self.config.noise_multiplicity,
            "delta": self._delta,
            "accountant": self.config.accountant if self.private else None,
            "history": [list(entry) for entry in self.accountant.history] if self.private else [],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict`. Refuses (UserInputError) a state whose DP mode, accountant, noise
        multiplier, sample rate or dataset size differ from this run's: its epsilon would not compose."""
        sd = state_dict
        if bool(sd.get("private")) != self.private:
            was = "with" if sd.get("private") else "without"
            raise UserInputError(f"The checkpoint was trained {was} DP: resume with the same `disable_dp`.")
        if sd.get("dataset_size") != self.dataset_size:
            raise UserInputError(
                f"The checkpoint was trained on {sd.get('dataset_size')} examples, this run has {self.dataset_size}: "
                "resume on the same training set."
            )
        if self.private:
            if sd.get("accountant") != self.config.accountant:
                raise UserInputError(
                    f"The checkpoint used accountant {sd.get('accountant')!r}: resume with "
                    f"`accountant` {sd.get('accountant')}."
                )
            for key, flag in (("sample_rate", "expected_batch_size"), ("noise_multiplier", "noise_multiplier")):
                theirs, ours = sd.get(key), getattr(self, key)
                if theirs is None or not math.isclose(float(theirs), float(ours), rel_tol=1e-9, abs_tol=0.0):
                    raise UserInputError(
                        f"The checkpoint's {key} {theirs} differs from this run's {ours}: resume with the same "
                        f"`{flag}`, `target_epsilon`, `noise_multiplier` and planned steps "
                        f"(`epochs` / `max_steps`)."
                    )
            history = [(float(s), float(q), int(t)) for s, q, t in sd.get("history", [])]
            self.accountant.load_state_dict({"history": history, "mechanism": self.config.accountant})
            self._steps = history_steps(history)
        else:
            self._steps = int(sd.get("steps", 0))
        self._epsilon_cache = None

    def summary(self) -> dict:
        """What to write to privacy.json."""
        private = self.private
        return {
            "private": private,
            "epsilon": self.epsilon,
            "target_epsilon": self.config.target_epsilon if private else None,
            "delta": self._delta,
            "delta_source": None if not private else "given" if self.config.delta is not None else "default",
            "accountant": self.config.accountant if private else None,
            "noise_multiplier": self._noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm if private else None,
            "sample_rate": self._sample_rate if private else None,
            "expected_batch_size": self.config.expected_batch_size,
            "steps": self._steps,
            "planned_steps": self._planned_steps,
            # Expected passes over the data: q per logical step.
            "epochs": self._steps * self.config.expected_batch_size / self.dataset_size,
            "dataset_size": self.dataset_size,
            "noise_multiplicity": self.config.noise_multiplicity,
            "dp_library": {"name": "opacus", "version": opacus.__version__} if private else None,
            "world_size": self._world_size,
            "grad_sample_mode": self.config.grad_sample_mode if private else None,
            "randomness": self.randomness if private else None,
            # A valid DP release: private, with secret noise and masks (not seeded, not a caller's generator).
            "valid_dp_release": private and self.randomness["valid_dp_release"],
        }

    @property
    def randomness(self) -> dict:
        """Where the noise and the Poisson masks came from (never the seeds or states themselves), and whether that
        makes a valid DP release: only when both were secret (``randomness.py``)."""
        noise, sampling = self._randomness["noise"], self._randomness["sampling"]
        valid = noise in (OS_ENTROPY, CSPRNG) and sampling in (OS_ENTROPY, CSPRNG)
        return {
            "noise": noise,
            "sampling": sampling,
            "noise_source": None if noise is None else noise_source_description(noise),
            "sampling_source": None if sampling is None else noise_source_description(sampling),
            "gaussian_sampling": "Opacus secure_mode (sum of 4 Gaussians, against floating-point attacks)",
            "valid_dp_release": valid,
        }
