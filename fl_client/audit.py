"""`python -m fl_client.audit verify STATE_DIR/audit.jsonl`: check the hospital's own
audit trail (every transfer that left it, every refusal) and name the first record
that was edited, removed or reordered. The format and checks live in fl_core.audit."""

from __future__ import annotations

import sys

from fl_core.audit import main as audit_main


def main(argv: list[str] | None = None) -> int:
    return audit_main(argv, prog="python -m fl_client.audit")


if __name__ == "__main__":
    sys.exit(main())
