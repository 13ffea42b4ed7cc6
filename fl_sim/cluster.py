"""Ray for the simulation: start it embedded or join a cluster, size the worker pool,
and always shut it down.

Why it is shaped this way:
- Embedded by default (`ray.init` with this machine's CPUs), so a laptop needs
  nothing running; `--ray_address` joins a cluster started with `ray start`.
- Ray given an address nobody answers at waits for it without end, so the address
  is probed first (a TCP connect to the head's port) and the join runs under a
  watchdog: an operator gets one line saying what failed, never a hang or a
  traceback.
- A bounded pool of actors, each asking for `--cpus_per_hospital` and
  `--gpus_per_hospital`, trains every virtual hospital in turn: never one process
  per hospital, so a thousand hospitals cost a handful of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fl_sim.settings import SimSettings

if TYPE_CHECKING:
    from fl_sim.worker import WorkerSpec


EMBEDDED_START_ATTEMPTS = 2


class SimError(RuntimeError):
    """The simulation cannot go on; the message is the one line an operator sees."""


class RayUnavailable(SimError):
    """Ray is missing, or could not be started or joined."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(
            f"Ray is not installed in this Python ({exc}); install the project's"
            " dependencies (pip install ray==2.60.0)") from None
    return ray


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for "auto"."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayUnavailable(f"--ray_address {address!r} is not host:port, ray://host:port"
                             " or auto")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float) -> None:
    """Fail fast when nothing listens at the head's address."""
    hostport = split_address(address)
    if hostport is None:
        return
    host, port = hostport
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"no Ray cluster at --ray_address {address} ({exc.strerror or exc}); start one"
            " with `ray start --head` or check the address") from None


def _quiet_ray_loggers() -> None:
    for name in ("ray", "ray._private", "ray.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init(ray: Any, settings: SimSettings) -> None:
    common: dict[str, Any] = {"log_to_driver": settings.ray_logs, "logging_level": logging.ERROR,
                              "include_dashboard": False}
    if settings.ray_address:
        probe(settings.ray_address, settings.ray_connect_timeout_s)
        ray.init(address=settings.ray_address, **common)
        return
    for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=settings.num_cpus or os.cpu_count() or 1,
                     num_gpus=None if settings.gpus_per_hospital else 0, **common)
            return
        except Exception:
            # Ray gives its raylet a fixed 30 s to register; a machine busy enough
            # misses that once and makes it the next time.
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == EMBEDDED_START_ATTEMPTS:
                raise


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[int]:
    """Ray's C++ core writes its warnings straight to file descriptor 2 while it starts
    or connects (e.g. every failed try to reach the head); they go to a temporary file
    so that a failure is the one line this module prints. Yields the real stderr's fd."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield saved
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _init_with_watchdog(ray: Any, settings: SimSettings) -> None:
    """ray.init, but a join that hangs ends the process with one line after the timeout
    (ray.init cannot be interrupted from another thread, and must run on this one).
    Embedded Ray bounds its own start (and is retried), so only a join is watched."""
    done = threading.Event()
    with _stderr_to_file() as real_stderr:

        def watchdog() -> None:
            if not done.wait(settings.ray_connect_timeout_s):
                line = (f"fl-sim: error: --ray_address {settings.ray_address} did not answer within"
                        f" {settings.ray_connect_timeout_s:.0f} s (--ray_connect_timeout_s)\n")
                os.write(real_stderr, line.encode())
                os._exit(3)

        if settings.ray_address:
            threading.Thread(target=watchdog, name="ray-init-watchdog", daemon=True).start()
        try:
            _init(ray, settings)
        finally:
            done.set()


@contextlib.contextmanager
def ray_session(settings: SimSettings) -> Iterator[Any]:
    """Ray started (or joined) for the run, and always shut down after it."""
    ray = import_ray()
    _quiet_ray_loggers()
    try:
        _init_with_watchdog(ray, settings)
    except RayUnavailable:
        raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()
        where = f"join the Ray cluster at --ray_address {settings.ray_address}" \
            if settings.ray_address else "start Ray on this machine"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayUnavailable(f"could not {where}: {type(exc).__name__}: {first}") from None
    try:
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()


def pool_size(settings: SimSettings, resources: dict[str, float], most_tasks: int) -> int:
    """Actors in the pool: what the cluster's CPUs (and GPUs) fit, at most one per task
    in the largest round, at least one; --workers overrides."""
    if settings.workers:
        return max(1, min(settings.workers, most_tasks))
    fits = math.floor(resources.get("CPU", 0.0) / settings.cpus_per_hospital + 1e-9)
    if fits < 1:
        raise SimError(f"--cpus_per_hospital {settings.cpus_per_hospital:g}: the Ray cluster"
                       f" has {resources.get('CPU', 0.0):g} CPU(s)")
    if settings.gpus_per_hospital:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / settings.gpus_per_hospital
                                    + 1e-9))
        if fits < 1:
            raise SimError(f"--gpus_per_hospital {settings.gpus_per_hospital:g}: the Ray"
                           f" cluster has {resources.get('GPU', 0.0):g} GPU(s)")
    return max(1, min(fits, most_tasks))


def start_pool(ray: Any, settings: SimSettings, spec: WorkerSpec,
               size: int) -> tuple[list[Any], list[str]]:
    """`size` actors, each reserving one hospital's CPUs and GPUs, and the device each
    trains on; returns once all have started (so a worker that cannot import the
    project, or cannot see the GPU it reserved, fails here, clearly)."""
    from fl_sim.worker import HospitalWorker

    remote_cls = ray.remote(HospitalWorker).options(
        num_cpus=settings.cpus_per_hospital, num_gpus=settings.gpus_per_hospital,
        max_restarts=0)
    actors = [remote_cls.remote(spec) for _ in range(size)]
    try:
        devices: list[str] = ray.get([a.ready.remote() for a in actors])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise SimError(f"the Ray workers could not start: {first}") from None
    return actors, devices
