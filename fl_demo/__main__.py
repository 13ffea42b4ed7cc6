"""`python -m fl_demo`: see fl_demo/demo.py (what `make demo` runs)."""

from __future__ import annotations

import sys

from fl_demo.demo import main

if __name__ == "__main__":
    sys.exit(main())
