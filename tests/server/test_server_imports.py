"""What a server daemon loads at start-up: every connected hospital and every job share
one process for months, so a heavy package loaded for a feature a job may never use is
memory held all that time. Opacus (with scipy and its grad samplers, ~120 MB) is needed
by DP-FedAvg's accountant only, and is loaded when that strategy first reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_server_and_its_dp_strategy_load_without_opacus_until_an_epsilon_is_asked() -> None:
    probe = (
        "import sys\n"
        "import fl_server.server\n"
        "from fl_server.strategies.dp_fedavg import DPFedAvg\n"
        "print(sorted(m for m in ('opacus', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
