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

Like Opacus' ``PrivacyEngine``, this class only orchestrates; each job lives in a module named for what it holds:
``calibration.py`` (sample rate, planned steps, delta, noise multiplier, budget guard), ``wrapping.py`` (checks on
the inputs, the private model and optimizer), ``sampling.py`` (the loaders), ``loop.py`` (the phases of each physical
batch), ``state.py`` (checkpoint state), ``randomness.py`` (where noise and masks come from) and
``opacus_internals.py`` (every touch of Opacus' private fields, and the Opacus versions they were read from).

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

import sys
import warnings
from collections.abc import Iterator

import opacus
import torch
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from .accounting import epsilon_after, make_accountant
from .bookkeeping import BOOKKEEPING_INPUTS
from .calibration import Calibration
from .config import PrivacyConfig
from .grad_sample import DPGradSampleModule
from .loop import LoopState, loss_rows
from .opacus_internals import clear_skip_signals, discard_accumulated, last_step_skipped, leave_empty_backward
from .randomness import CALLER, RandomnessSource, randomness_report
from .sampling import StepSignals, batch_length, poisson_loader, shuffled_loader, split_physical
from .state import engine_state, restore_state
from .wrapping import (
    check_data_loader,
    check_optimizer,
    check_unwrapped,
    plain_local_batch_size,
    resolve_distributed,
    wrap_private,
)


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
        if self.private and config.accountant == "gdp":
            warnings.warn(
                "The gdp accountant is experimental and can underestimate epsilon; prefer prv.", stacklevel=2
            )
        self._calibration = Calibration.from_config(config, dataset_size=dataset_size)
        self.accountant = make_accountant(config.accountant) if self.private else None
        self._steps = 0
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._raw_module: nn.Module | None = None
        self._world_size = 1
        self._rank = 0
        self._local_batch_size = config.expected_batch_size
        self._signals = StepSignals()  # without DP: which physical batch closes a logical one
        self._epoch = 0
        self._loop = LoopState()
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
        return self._calibration.noise_multiplier

    @property
    def sample_rate(self) -> float:
        """Poisson sample rate ``expected_batch_size / dataset_size`` (what the sampler and the accountant use)."""
        return self._calibration.sample_rate

    @property
    def noise_to_signal(self) -> float | None:
        """sigma / B: the standard deviation of one step's noise on the averaged clipped gradient, in units of the
        clip bound C (which bounds any one example's signal). None without DP."""
        if self.noise_multiplier is None:
            return None
        return self.noise_multiplier / self.config.expected_batch_size

    @property
    def planned_steps(self) -> int | None:
        return self._calibration.planned_steps

    @property
    def delta(self) -> float | None:
        return self._calibration.delta

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
            eps = epsilon_after(self.accountant.history, accountant=self.config.accountant, delta=self.delta)
            self._epsilon_cache = (self._steps, eps)
        return self._epsilon_cache[1]

    @property
    def budget_exhausted(self) -> bool:
        """True if one more logical step would push epsilon over ``target_epsilon``: stop *before* that step."""
        return self._calibration.budget_exhausted(self._steps)

    @property
    def finished(self) -> bool:
        """The planned steps are done or the budget is exhausted; :meth:`physical_batches` then yields nothing."""
        return self._calibration.finished(self._steps)

    @property
    def randomness(self) -> dict:
        """Where the noise and the Poisson masks came from (never the seeds or states themselves), and whether that
        makes a valid DP release: only when both were secret (``randomness.py``)."""
        return randomness_report(noise=self._randomness["noise"], sampling=self._randomness["sampling"])

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
        check_unwrapped(module)
        distributed = resolve_distributed(distributed)
        if distributed:
            self._world_size = torch.distributed.get_world_size()
            self._rank = torch.distributed.get_rank()
        check_data_loader(
            data_loader, dataset_size=self.dataset_size, expected_batch_size=self.config.expected_batch_size
        )
        check_optimizer(module, optimizer)
        self._raw_module = module
        rank, world_size = self._rank, self._world_size
        if self.private:
            source = RandomnessSource() if seed is None else RandomnessSource.seeded(seed)
            device = next(p.device for group in optimizer.param_groups for p in group["params"])
            sampling_generator = source.generator(offset=1 + rank)  # the sampler draws on the CPU
            self._randomness = {"sampling": source.generator_kind(), "noise": CALLER}
            if noise_generator is None:
                noise_generator = source.generator(device=device)
                self._randomness["noise"] = source.generator_kind(device)
            self.module, self.optimizer = wrap_private(
                module,
                optimizer,
                config=self.config,
                calibration=self._calibration,
                accountant=self.accountant,
                distributed=distributed,
                world_size=world_size,
                noise_generator=noise_generator,
            )
            loader = poisson_loader(
                data_loader,
                sample_rate=self.sample_rate,
                generator=sampling_generator,
                rank=rank,
                world_size=world_size,
            )
        else:
            # Without DP nothing is secret; the shuffle seed must only agree across ranks (torch's global generator,
            # seeded alike on every rank by set_seed, as before).
            shuffle_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
            self._local_batch_size = plain_local_batch_size(self.config, world_size=world_size)
            self.module, self.optimizer = (DDP(module) if distributed else module), optimizer
            loader = shuffled_loader(
                data_loader, batch_size=self._local_batch_size, seed=shuffle_seed, rank=rank, world_size=world_size
            )
        return self.module, self.optimizer, loader

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
        loop = self._loop
        completed = False
        try:
            while True:
                loop.check_next_batch()
                if not loop.logical_batch_open and self.finished:
                    break
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                loop.batch_yielded(batch_length(batch))
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
            elif not completed or loop.logical_batch_open:
                self._discard_partial()
            elif self.private:
                clear_skip_signals(self.optimizer)
            else:
                self._signals.clear()

    def _discard_partial(self) -> None:
        """Forget a partially accumulated logical batch and any stale per-sample state (best effort, Opacus'
        internals: ``opacus_internals.discard_accumulated``)."""
        self._loop.reset()
        if self.optimizer is None:
            return
        if self.private:
            discard_accumulated(self.optimizer, self._raw_module, param_attrs=(BOOKKEEPING_INPUTS,))
        else:
            self._signals.clear()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def batch_is_empty(self) -> bool:
        """The physical batch just yielded holds no example: an empty Poisson draw (rare at large batches, certain
        over many steps at small ones). Its step still happens, noise only, and is counted: pass ``None`` to
        :meth:`backward` instead of running the model on zero rows (diffusers' attention fails on them)."""
        return self._loop.batch_is_empty

    def backward(self, per_row_loss: torch.Tensor | None) -> None:
        """Back-propagate one physical batch. ``per_row_loss``: one unreduced loss per row, shape ``[B * K]`` with
        K = noise_multiplicity and rows example-major (example i at rows ``i*K .. i*K+K-1``); ``None`` for an empty
        batch (:attr:`batch_is_empty`), whose logical step then adds noise only."""
        self._loop.check_backward()
        k = self.config.noise_multiplicity
        if per_row_loss is None:
            if self._loop.batch_examples != 0:
                raise ValueError("engine.backward(None) is for an empty Poisson batch only (engine.batch_is_empty).")
            if self.private:
                leave_empty_backward(self.optimizer, ghost=self.config.grad_sample_mode == "ghost")
            self._loop.backward_done()
            return
        rows = loss_rows(per_row_loss, examples=self._loop.batch_examples, multiplicity=k)
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
        self._loop.backward_done()

    def step(self) -> bool:
        """Finish a physical batch; on the last one of a logical batch, clip + noise + update. Returns True when a
        logical step was taken (step LR schedulers then), False when the batch was only accumulated."""
        self._loop.check_step()
        if self.private:
            self.optimizer.step()
            taken = not last_step_skipped(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            taken = self._signals.pop_is_last()
            if taken:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self._loop.step_done(taken=taken)
        if taken:
            self._steps += 1
        return taken

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to resume the accounting: history, steps, sigma, q and N (never any randomness)."""
        return engine_state(
            config=self.config,
            dataset_size=self.dataset_size,
            calibration=self._calibration,
            steps=self._steps,
            accountant=self.accountant,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict`. Refuses (UserInputError) a state whose DP mode, accountant, noise
        multiplier, sample rate or dataset size differ from this run's: its epsilon would not compose."""
        self._steps = restore_state(
            state_dict,
            config=self.config,
            dataset_size=self.dataset_size,
            calibration=self._calibration,
            accountant=self.accountant,
        )
        self._epsilon_cache = None

    def summary(self) -> dict:
        """What to write to privacy.json."""
        private = self.private
        return {
            "private": private,
            "epsilon": self.epsilon,
            "target_epsilon": self.config.target_epsilon if private else None,
            "delta": self.delta,
            "delta_source": None if not private else "given" if self.config.delta is not None else "default",
            "accountant": self.config.accountant if private else None,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm if private else None,
            "sample_rate": self.sample_rate if private else None,
            "expected_batch_size": self.config.expected_batch_size,
            "steps": self._steps,
            "planned_steps": self.planned_steps,
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
