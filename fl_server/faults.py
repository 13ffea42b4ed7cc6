"""Deterministic crash points for the fault tests.

A test that kills the server "during aggregation" from outside (a signal sent when
the last update is acknowledged) lands in whatever phase the server happens to be
in: the claim it makes is then only as good as the timing. A fault point lets the
test stop the process at one chosen line instead. It is off unless the environment
names it, so a production server never reaches the kill:

    FL_FAULT_POINT=aggregate      stop at the aggregate point of every round
    FL_FAULT_POINT=aggregate@2    only in round 2

The process is SIGKILLed (no cleanup, no atexit, no flush of anything not yet on
disk), exactly like the OOM killer or a power cut would end it.
"""

from __future__ import annotations

import logging
import os
import signal

FAULT_ENV = "FL_FAULT_POINT"

log = logging.getLogger("fl_server.faults")


def armed(point: str, round_no: int, spec: str | None = None) -> bool:
    """Whether `spec` (default: the environment's FL_FAULT_POINT) names this point
    and round."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    name, _, at = spec.strip().partition("@")
    if not name or name != point:
        return False
    return not at or at == str(round_no)


def fault_point(point: str, round_no: int) -> None:
    """SIGKILL this process here if the environment arms this point (see module doc)."""
    if not armed(point, round_no):
        return
    log.critical("fault_point point=%s round=%d: SIGKILL (%s is set)", point, round_no,
                 FAULT_ENV)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
