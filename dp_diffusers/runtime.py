"""Process-level settings for training on CPU: the allocator, and how Accelerate should see a multi-process run.

Why by hand: DP-SGD allocates each trained layer's per-sample gradients afresh on every physical batch (Opacus:
``B x out x in`` floats per ``nn.Linear``; 33 MB for one 512x64 layer at B = 256). PyTorch's CPU allocator does not
cache, and glibc's malloc serves blocks that large with ``mmap`` and returns them with ``munmap``, so every step
page-faults the same memory in again: measured here, an einsum writing a [256, 512, 64] tensor took 31 ms, 17 ms
with the setting below (benchmarks/README.md has the training-step figures). PyTorch's CPU tuning guide recommends
jemalloc or tcmalloc for the same reason; this is the glibc equivalent, with nothing to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


_RETAIN_MMAP_THRESHOLD = 1 << 30
_GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_libc = None  # set once retain_freed_memory() has applied


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the heap (no ``mmap`` per large block, no trimming), so that blocks
    of the same sizes are reused without page faults. Process-wide; the resident memory then stays at its peak
    (see :func:`transient_heap` for work whose peak must not stay). Returns False (and changes nothing) where the C
    library is not glibc."""
    global _libc
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False
    _libc = libc if applied else None
    return applied


@contextlib.contextmanager
def transient_heap():
    """Inside the block, large blocks get their own ``mmap`` again (glibc's default threshold), so they go back to
    the system when freed. For occasional work whose working memory grows with the run (the PRV accountant's
    domain grows with the step count): under :func:`retain_freed_memory` its peak would otherwise stay resident,
    and rise a little at each call (measured: +126 MB after 2,000 steps of epsilon every 10 steps; flat with this).
    A no-op unless :func:`retain_freed_memory` applied."""
    libc = _libc
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_MMAP_THRESHOLD)


def multi_process_cpu() -> bool:
    """True when this process is one of several (torchrun / ``accelerate launch`` set ``WORLD_SIZE``) and there is
    no GPU: pass it as ``Accelerator(cpu=...)``. Accelerate (1.15) counts such a launch as distributed only with
    ``cpu=True``; otherwise every process believes it is the main one, and all of them write the outputs."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
