"""dp_diffusers.runtime: the glibc allocator setting applies on glibc and is a no-op elsewhere; multi-process CPU."""

from __future__ import annotations

import platform

import pytest

from dp_diffusers import runtime


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retain_freed_memory_applies_on_glibc():
    assert runtime.retain_freed_memory() is True


def test_retain_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    called = []
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a, **k: called.append(a))
    assert runtime.retain_freed_memory() is False
    assert not called


def test_multi_process_cpu_only_for_several_processes_without_a_gpu(monkeypatch):
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.multi_process_cpu() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runtime.multi_process_cpu() is True
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    assert runtime.multi_process_cpu() is False


LONG_RUN_ACCOUNTING = """
import warnings
from pathlib import Path

from dp_diffusers import runtime
from dp_diffusers.privacy import epsilon_after


def rss_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


warnings.filterwarnings("ignore")
assert runtime.retain_freed_memory()
epsilon_after([(0.8, 64 / 1797, 1000)], accountant="prv", delta=1e-5)
start = rss_mib()
for steps in range(1010, 2010, 40):  # a new domain length (and FFT length) at every call, as in a long run
    epsilon_after([(0.8, 64 / 1797, steps)], accountant="prv", delta=1e-5)
print(rss_mib() - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_epsilon_of_a_growing_run_does_not_grow_resident_memory():
    """Under retain_freed_memory, PRV accounting at a growing step count kept its working memory (and scipy.fft
    its plans): +200 MB over these calls before the fix. Now it goes back to the system after each call."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LONG_RUN_ACCOUNTING], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 30  # MiB


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_transient_heap_restores_the_retaining_threshold(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(runtime, "_libc", FakeLibc())
    with runtime.transient_heap():
        assert calls == [(runtime._M_MMAP_THRESHOLD, 128 * 1024)]
    assert calls[-1] == (runtime._M_MMAP_THRESHOLD, 1 << 30)
    monkeypatch.setattr(runtime, "_libc", None)
    calls.clear()
    with runtime.transient_heap():
        pass
    assert calls == []  # nothing to undo when memory is not retained
