"""The server's cap on glibc's malloc heaps (fl_core/allocator.py limit_arenas): the
threads of a process started with it share the capped heaps instead of taking one each.
Each case runs in a fresh interpreter, since the cap is process-wide and only holds for
threads that have not yet allocated."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from fl_core.allocator import arenas_set_by_environment, limit_arenas

# Eight threads alive together, each allocating through libc (ctypes drops the GIL, so
# the calls really overlap), then malloc_stats() prints one "Arena N:" per heap.
_PROBE = textwrap.dedent("""
    import ctypes, sys, threading
    from fl_core.allocator import limit_arenas
    if sys.argv[1] != "default":
        assert limit_arenas(int(sys.argv[1]))
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(8)
    def work():
        blocks = [libc.malloc(4096) for _ in range(200)]
        barrier.wait(timeout=30)
        for b in blocks:
            libc.free(b)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    libc.malloc_stats()
""")


def _is_glibc() -> bool:
    try:
        ctypes.CDLL(None).malloc_stats  # noqa: B018 - presence is the check
    except (OSError, AttributeError):
        return False
    return True


def _arenas(cap: str) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE, cap], capture_output=True,
                          text=True, timeout=60, check=True)
    return sum(1 for line in done.stderr.splitlines() if line.startswith("Arena "))


@pytest.mark.skipif(not _is_glibc(), reason="malloc arenas are glibc's")
def test_threads_share_the_capped_heaps() -> None:
    assert _arenas("default") > 2  # the default: a heap per thread, up to 8 per core
    assert _arenas("2") == 2


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="arenas must be >= 1"):
        limit_arenas(0)


def test_the_operators_arena_count_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000")
    assert not arenas_set_by_environment()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert arenas_set_by_environment()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert arenas_set_by_environment()
