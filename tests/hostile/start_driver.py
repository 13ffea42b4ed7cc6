"""Run many server starts that are expected to fail, each in its own process.

Importing the server (torch, gRPC) costs a few seconds of CPU per process; this
driver imports it once and then forks one child per start. Each child is a real
process: it runs `fl_server.server.main(argv)` with its own working directory and
its stderr (file descriptor 2, so gRPC's own C-level logs and any traceback land
there too) redirected to a file, and exits with main's return code; an exception
escaping main is printed as the interpreter would print it, with exit code 1. A
child that writes its ready file started when it should not have, and is killed.

    python -m tests.hostile.start_driver plan.json results.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path


def _child(argv: list[str], cwd: str, stderr_path: str) -> None:
    os.chdir(cwd)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the child exits right after
    code = 1
    try:
        from fl_server.server import main
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def run(plan: list[dict[str, object]], parallel: int, timeout_s: float) -> list[dict[str, object]]:
    import fl_server.server  # noqa: F401 - imported once, before any fork
    from fl_models.registry import get_task

    get_task("breast_cancer")  # and the task's own imports

    results: list[dict[str, object]] = [{} for _ in plan]
    pending = list(range(len(plan)))
    running: dict[int, tuple[int, float]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            index = pending.pop(0)
            item = plan[index]
            pid = os.fork()
            if pid == 0:
                _child(list(item["argv"]), str(item["cwd"]),  # type: ignore[call-overload]
                       str(item["stderr"]))
            running[pid] = (index, time.monotonic())
        for pid, (index, started_at) in list(running.items()):
            ready = Path(str(plan[index]["ready"]))
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                results[index] = {"rc": code, "started": False}
                del running[pid]
            elif ready.exists() or time.monotonic() - started_at > timeout_s:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[index] = {"rc": None, "started": ready.exists(),
                                  "timed_out": not ready.exists()}
                del running[pid]
        time.sleep(0.02)
    return results


def main() -> int:
    plan_path, results_path = sys.argv[1], sys.argv[2]
    plan = json.loads(Path(plan_path).read_text())
    results = run(plan["starts"], int(plan.get("parallel", 2)), float(plan.get("timeout_s", 60)))
    Path(results_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
