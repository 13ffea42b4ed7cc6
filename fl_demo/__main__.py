"""`python -m fl_demo`: see fl_demo/demo.py (what `make demo` runs)."""

from __future__ import annotations

import sys
import time

STARTED = time.monotonic()  # before the heavy imports, so the reported wall time is honest

from fl_demo.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
