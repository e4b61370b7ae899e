"""Process-level settings for training on CPU: the allocator, and how Accelerate should see a multi-process run.

Why by hand: DP-SGD allocates each trained layer's per-sample gradients afresh on every physical batch (Opacus:
``B x out x in`` floats per ``nn.Linear``; 33 MB for one 512x64 layer at B = 256). PyTorch's CPU allocator does not
cache, and glibc's malloc serves blocks that large with ``mmap`` and returns them with ``munmap``, so every step
page-faults the same memory in again: measured here, an einsum writing a [256, 512, 64] tensor took 31 ms, 17 ms
with the setting below (benchmarks/README.md has the training-step figures). PyTorch's CPU tuning guide recommends
jemalloc or tcmalloc for the same reason; this is the glibc equivalent, with nothing to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the heap (no ``mmap`` per large block, no trimming), so that blocks
    of the same sizes are reused without page faults. Process-wide; the resident memory then stays at its peak.
    Returns False (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def multi_process_cpu() -> bool:
    """True when this process is one of several (torchrun / ``accelerate launch`` set ``WORLD_SIZE``) and there is
    no GPU: pass it as ``Accelerator(cpu=...)``. Accelerate (1.15) counts such a launch as distributed only with
    ``cpu=True``; otherwise every process believes it is the main one, and all of them write the outputs."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
