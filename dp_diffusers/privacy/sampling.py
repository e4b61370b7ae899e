"""Data loaders: Poisson-sampled logical batches (DP), shuffled ones (no DP), and their split into physical batches.

Reused from Opacus: ``DPDataLoader`` (Poisson sampling, empty-batch collation) and ``BatchSplittingSampler`` /
``wrap_data_loader`` (what ``BatchMemoryManager`` uses to split logical batches). Hand-written, and why:

* sharding for several processes: Opacus' ``DistributedUniformWithReplacementSampler`` *skips* empty draws, so a rank
  whose shard drew nothing yields one logical batch fewer than the others; its all-reduce then pairs with another
  rank's next step, or blocks forever. Here each rank Poisson-samples its own fixed shard with
  ``UniformWithReplacementSampler`` (through ``DPDataLoader``), which yields empty batches too, so every rank runs
  exactly ``int(1 / q)`` logical steps per epoch. Each example still joins each logical batch independently with
  probability q, so the union over ranks is a Poisson sample of the whole set with expected size ``q * N``;
* each rank's Poisson masks come from its own generator (by default seeded from OS entropy, ``randomness.py``):
  ranks seeded alike would draw the same masks, correlating which examples of different shards are sampled
  together, and masks anyone can replay lose the amplification by subsampling;
* :class:`StepSignals` stands in for ``DPOptimizer.signal_skip_step`` so that the non-private loop can reuse
  ``BatchSplittingSampler`` to split its batches the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Subset

# Fixed seed of the permutation that assigns examples to ranks (the same on every rank, as Opacus' shuffle_seed=0).
SHARD_SEED = 0


def _loader_kwargs(data_loader: DataLoader) -> dict:
    """The settings of ``data_loader`` worth keeping (not its sampler nor its batch size)."""
    return {
        "collate_fn": data_loader.collate_fn,
        "num_workers": data_loader.num_workers,
        "pin_memory": data_loader.pin_memory,
        "timeout": data_loader.timeout,
        "worker_init_fn": data_loader.worker_init_fn,
        "multiprocessing_context": data_loader.multiprocessing_context,
        "prefetch_factor": data_loader.prefetch_factor,
        "persistent_workers": data_loader.persistent_workers,
    }


def rank_shard(dataset, *, rank: int, world_size: int, seed: int = SHARD_SEED):
    """The examples rank ``rank`` samples from: every ``world_size``-th of a fixed random permutation."""
    if world_size == 1:
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, perm[rank::world_size].tolist())


def poisson_loader(
    data_loader: DataLoader,
    *,
    sample_rate: float,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> DPDataLoader:
    """A DPDataLoader over this rank's shard of ``data_loader.dataset``, each example drawn w.p. ``sample_rate``
    with ``generator`` (this rank's own, secret unless the run is labelled reproducible)."""
    if isinstance(data_loader.dataset, IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset, not an IterableDataset.")
    shard = rank_shard(data_loader.dataset, rank=rank, world_size=world_size)
    return DPDataLoader(shard, sample_rate=sample_rate, generator=generator, **_loader_kwargs(data_loader))


def shuffled_loader(
    data_loader: DataLoader,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Non-private loader: reshuffled each epoch, ``batch_size`` examples per rank, incomplete batches dropped."""
    dataset = data_loader.dataset
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        generator = None
    else:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **_loader_kwargs(data_loader),
    )


class StepSignals:
    """FIFO of "is this physical batch the last of its logical batch?" flags, fed by ``BatchSplittingSampler``.

    Duck-types the one method of ``DPOptimizer`` the sampler calls (``signal_skip_step``).
    """

    def __init__(self):
        self._queue: deque[bool] = deque()

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self._queue.append(do_skip)

    def next_is_last(self) -> bool:
        return not self._queue[0] if self._queue else True

    def pop_is_last(self) -> bool:
        return not self._queue.popleft() if self._queue else True

    def clear(self) -> None:
        self._queue.clear()


def split_physical(data_loader: DataLoader, *, max_physical_batch_size: int, signals) -> DataLoader:
    """Split each batch of ``data_loader`` into chunks of at most ``max_physical_batch_size``; ``signals`` (a
    DPOptimizer or :class:`StepSignals`) learns which chunk closes a logical batch. Opacus' BatchMemoryManager."""
    return wrap_data_loader(data_loader=data_loader, max_batch_size=max_physical_batch_size, optimizer=signals)


def batch_length(batch) -> int | None:
    """Number of examples in a collated batch: dim 0 of its first tensor (searching dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        n = batch_length(value)
        if n is not None:
            return n
    return None
