"""`python -m fl_server.security` (the seed's command) is the fl-keys CLI.

The CA tooling lives in fl_server/pki.py and the per-call checks in
fl_server/tokens.py; this module keeps the documented command working.
"""

from __future__ import annotations

import sys

from fl_server.pki import main

if __name__ == "__main__":
    sys.exit(main())
