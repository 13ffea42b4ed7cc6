"""The daemons' collector settings (fl_core/gc_policy.py), in a fresh interpreter so
this test process keeps its own."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fl_core.constants import GC_FULL_INTERVAL_S, GC_GEN0_THRESHOLD

PROBE = """
import gc, json
import fl_core.gc_policy as p
class Cycle:
    pass
before = gc.get_freeze_count()
p.settle_after_startup()
frozen = gc.get_freeze_count()
c = Cycle(); c.self = c; del c   # a cycle made after start-up is still collected
found = gc.collect()
print(json.dumps([before, frozen, gc.get_threshold()[0], found]))
"""


def test_startup_heap_frozen_and_young_collections_rarer() -> None:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    before, frozen, threshold, found = json.loads(out)
    assert before == 0 and frozen > 1000  # the imported modules' objects
    assert threshold == GC_GEN0_THRESHOLD
    assert found >= 1  # cycles still collected


def test_a_round_s_garbage_is_collected_at_its_end() -> None:
    """collect_round_garbage (called by the round engine after every attempt) frees
    young cycles however far the raised threshold still is."""
    import gc
    import weakref

    from fl_core.gc_policy import collect_round_garbage

    class Cycle:
        pass

    gc.disable()  # no collection but the one under test
    try:
        c = Cycle()
        c.self = c  # type: ignore[attr-defined]
        ref = weakref.ref(c)
        del c
        assert ref() is not None
        collect_round_garbage()
        assert ref() is None
    finally:
        gc.enable()


def test_a_cycle_that_outlived_its_round_is_collected_within_the_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What is alive at a round's end (its state, shares, updates) is promoted by the
    young collection into the oldest generation, which young collections never reach
    again: the server grew by ~35 KB a round until CPython's own full collection, which
    the start-up freeze had put thousands of rounds away. collect_round_garbage also
    collects that generation every GC_FULL_INTERVAL_S."""
    import gc
    import weakref

    import fl_core.gc_policy as policy

    class Cycle:
        pass

    gc.disable()  # no collection but the ones under test
    try:
        monkeypatch.setitem(policy._full, "at", time.monotonic())  # one just happened
        c = Cycle()
        c.self = c  # type: ignore[attr-defined]
        ref = weakref.ref(c)
        assert not policy.collect_round_garbage()  # alive at its round's end: promoted
        del c  # garbage a round later
        assert not policy.collect_round_garbage()
        assert ref() is not None  # out of the young collections' reach
        monkeypatch.setitem(policy._full, "at", time.monotonic() - GC_FULL_INTERVAL_S)
        assert policy.collect_round_garbage()
        assert ref() is None
        assert not policy.collect_round_garbage()  # the next one waits its interval again
    finally:
        gc.enable()


TRIM_PROBE = """
import json
from fl_core.allocator import release_free_heap
def anon():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("RssAnon:")) // 1024
blocks = [bytearray(64 << 10) for _ in range(2000)]   # 125 MiB of heap, touched
pin = bytearray(64 << 10)                              # keeps the heap's top in use
del blocks[:]                                          # free, but in the heap's middle
before = anon()
released = release_free_heap()
print(json.dumps([before, anon(), released, len(pin)]))
"""


def test_free_heap_handed_back() -> None:
    """release_free_heap (after a large model's round) returns freed heap memory that
    free() alone keeps resident, in a fresh interpreter (glibc only)."""
    import json

    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    before, after, released, pinned = json.loads(out)
    assert released and pinned == 64 << 10
    assert before - after >= 64  # MiB: most of the 125 freed
