"""The daemons' collector settings (fl_core/gc_policy.py), in a fresh interpreter so
this test process keeps its own."""

from __future__ import annotations

import subprocess
import sys

from fl_core.constants import GC_GEN0_THRESHOLD

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
