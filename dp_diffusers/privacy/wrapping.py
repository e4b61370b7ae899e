"""Wrapping: the checks on what the caller hands to ``make_private``, and the private model and optimizer.

Checked first: a bare model (no DDP, no GradSampleModule), the full un-sharded training set with the logical batch
size, a plain optimizer over the model's own parameters, and (with DP) modules Opacus can compute per-sample
gradients for (``compatibility.py``). With DP the model and optimizer come from Opacus' parts:
``DifferentiallyPrivateDistributedDataParallel`` (several processes), a per-sample gradient module
(``DPGradSampleModule`` from ``grad_sample.py`` for hooks and book-keeping, Opacus' ``prepare_module`` for functorch
and ghost clipping) and a ``DPOptimizer`` (``optimizers.py``; Opacus' fast gradient clipping ones for ghost) with
the accountant's step hook. Without DP: torch DDP (several processes) and the optimizer as given, each process
holding an equal share of the logical batch. The loaders are ``sampling.py``'s (Poisson with DP, else shuffled).
"""

from __future__ import annotations

import torch
from opacus.accountants import IAccountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleModule, prepare_module
from opacus.optimizers import (
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import UserInputError
from .calibration import Calibration
from .compatibility import check_trainable_modules
from .config import PrivacyConfig
from .grad_sample import DPGradSampleModule
from .optimizers import engine_optimizer_class

# ---------------------------------------------------------------------------------------------------- checks


def check_unwrapped(module: nn.Module) -> None:
    if isinstance(module, (DDP, AbstractGradSampleModule)):
        raise UserInputError(
            f"make_private got an already wrapped model ({type(module).__name__}): pass the bare model; the "
            "engine wraps it (with DP, do not accelerator.prepare the model, optimizer or data loader)."
        )


def resolve_distributed(distributed: bool | None) -> bool:
    """``distributed`` as given, or True when a process group with more than one process is initialised."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        return initialised and torch.distributed.get_world_size() > 1
    if distributed and not initialised:
        raise UserInputError(
            "distributed=True needs an initialised torch.distributed process group: launch with torchrun or "
            "accelerate launch (and create the Accelerator before the engine)."
        )
    return bool(distributed)


def check_data_loader(data_loader: DataLoader, *, dataset_size: int, expected_batch_size: int) -> None:
    n = len(data_loader.dataset)
    if n != dataset_size:
        raise UserInputError(
            f"The data loader holds {n} examples but the engine was built for dataset_size={dataset_size}: "
            "pass the full, un-sharded training set to both."
        )
    if isinstance(data_loader.sampler, DistributedSampler):
        raise UserInputError(
            "The data loader is already sharded (DistributedSampler): pass the full training set loader; the "
            "engine shards it across processes itself (do not accelerator.prepare it)."
        )
    b = expected_batch_size
    if data_loader.batch_size not in (None, b):
        raise UserInputError(
            f"The data loader's batch_size is {data_loader.batch_size} but the logical batch "
            f"`expected_batch_size` is {b}: build it with batch_size={b} (the engine splits batches into "
            f"physical ones of at most `max_physical_batch_size`)."
        )


def check_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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


# ---------------------------------------------------------------------------------------------------- wrapping


def wrap_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: PrivacyConfig,
    calibration: Calibration,
    accountant: IAccountant,
    distributed: bool,
    world_size: int,
    noise_generator: torch.Generator,
) -> tuple[AbstractGradSampleModule, DPOptimizer]:
    """The per-sample gradient module and the DPOptimizer (clipping, noise drawn from ``noise_generator``, the
    accountant's step hook at the calibrated sample rate). The Poisson loader is ``sampling.poisson_loader``."""
    cfg = config
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
    optimizer_class, kwargs = _optimizer_class(cfg, distributed=distributed)
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=calibration.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        # Opacus divides by expected_batch_size per rank, then averages over ranks: B / W * W = B examples.
        expected_batch_size=cfg.expected_batch_size / world_size,
        loss_reduction="mean",
        generator=noise_generator,
        # Opacus' floating-point-safe Gaussian sampling (the noise half of its secure_mode; see randomness.py).
        secure_mode=True,
        **kwargs,
    )
    # The accountant is fed exactly q = B / N at every logical step (Opacus' hook multiplies it by the number of
    # accumulated backward passes, which forbid_grad_accumulation keeps at 1).
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=calibration.sample_rate))
    return gsm, dp_optimizer


def _optimizer_class(config: PrivacyConfig, *, distributed: bool):
    if config.grad_sample_mode == "ghost":
        return (DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping), {}
    return engine_optimizer_class(distributed=distributed, noise_multiplicity=config.noise_multiplicity)


def plain_local_batch_size(config: PrivacyConfig, *, world_size: int) -> int:
    """Without DP each of the ``world_size`` processes trains on an equal share of the logical batch (its loader is
    ``sampling.shuffled_loader``, its model torch DDP when distributed)."""
    b, w = config.expected_batch_size, world_size
    if b % w:
        raise UserInputError(f"`expected_batch_size` ({b}) must be a multiple of the {w} processes.")
    if config.physical_batch_size > b // w:
        raise UserInputError(
            f"`max_physical_batch_size` ({config.physical_batch_size}) exceeds the per-process "
            f"batch {b // w}: lower it."
        )
    return b // w
