"""training.allocator: after keep_freed_memory(), glibc serves a large block from the heap (no
fresh mmap whose pages fault in on every training step)."""

import ctypes
import platform

import pytest

from training import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_large_allocations_are_not_mmapped_after_keep_freed_memory():
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    assert allocator.keep_freed_memory() is True
    mmapped_before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)  # above glibc's largest mmap threshold (32 MiB)
    assert block
    mmapped_during = libc.mallinfo2().hblks
    libc.free(block)
    assert mmapped_during == mmapped_before


def test_keep_freed_memory_reports_whether_it_applied():
    assert allocator.keep_freed_memory() is GLIBC


@pytest.mark.parametrize("enabled", [True, False])
def test_build_training_applies_it_unless_disabled(monkeypatch, enabled):
    from training import config as config_lib
    from training import trainer

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    config = config_lib.TrainConfig(
        data_dir="tests/fixtures/cifar10",
        limit_per_class=1,
        val_split=None,
        dim=8,
        depth=1,
        batch_size=4,
        verbose=0,
        keep_freed_memory=enabled,
    )
    trainer.build_training(config)
    assert len(calls) == int(enabled)
