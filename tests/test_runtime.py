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
