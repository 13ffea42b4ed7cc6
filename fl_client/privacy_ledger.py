"""A hospital's persistent record of the differential-privacy budget it has spent.

Why it exists: local DP only protects patients if the *total* privacy loss over
every round the hospital ever trained stays bounded. The server cannot be trusted
to keep that count, and a daemon restart must not forget it, so each client keeps
its own ledger on disk and refuses to train once the next round would push the
total over the operator's budget.

How the total is computed: rounds are composed by handing an Opacus accountant the
history of every round as ``(noise_multiplier, sample_rate, steps)`` and asking for
epsilon at the ledger's delta, never by adding per-round epsilons (the naive sum is
an upper bound that wastes budget). Two accountants are offered (``ACCOUNTANTS``):
- ``"prv"`` (the default): Opacus's PRV accountant (Gopi et al. 2021), a numerical
  composition of privacy loss random variables whose result is a rigorous *upper*
  bound within ``PRV_EPS_ERROR``; about 10% below RDP on the demo's settings. The
  figure kept is ``min(PRV, RDP)``: both are valid upper bounds, so the smaller one
  is too, and when PRV cannot run (its grid would be too large: very many rounds
  with distinct noise, or a numerical failure) the ledger falls back to RDP instead
  of failing a round.
- ``"rdp"``: Opacus's RDP accountant (Mironov 2017), the long-standing default.
Both are Opacus's own code; this module only caches the per-step RDP curve of each
``(noise_multiplier, sample_rate)`` (RDP is linear in steps, and computing a curve is
the slow part of both accountants: PRV sizes its grid with RDP bounds).

File format: version 2 records, in every entry, the accountant that computed its
figures; the run's ``(noise_multiplier, sample_rate, steps)`` is in the entry, so any
cumulative figure can be recomputed from the entries before it with either
accountant. Version-1 files (RDP only, no accountant per entry) are read as RDP
entries; the first write after that keeps a copy of the old file beside it
(``privacy_ledger_<id>.v1.json``) and writes version 2.

Rules the ledger keeps:
- Every training run spends budget, whether or not its update ever reached the
  server: the noise was drawn and the data touched. A round retried after a crash
  is recorded again under a new ``attempt`` number; nothing is ever replaced.
- It never resets. A missing file is an empty ledger; an unreadable, corrupt or
  foreign (other client, other delta) file is a ``LedgerError``, never a silent
  restart from zero.
- Writes are atomic (temporary file, fsync, ``os.replace``, fsync of the folder),
  and ``record`` re-reads the file under an exclusive lock, so two processes for
  the same hospital cannot lose each other's spend.
- Runs trained *without* DP (only possible with the operator's explicit flag) are
  recorded too, as ``dp_enabled=False`` entries outside the accountant: they carry
  no epsilon, but an auditor must see that the formal guarantee no longer covers
  data used in them (``non_private_runs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

from fl_core.constants import PRV_EPS_ERROR, PRV_FFT_PLANS_EVICTED, PRV_MAX_GRID_POINTS

LEDGER_FORMAT = "fl-privacy-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)
ACCOUNTANTS = ("prv", "rdp")
DEFAULT_ACCOUNTANT = "prv"

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALPHAS = tuple(RDPAccountant.DEFAULT_ALPHAS)

Mechanism = tuple[float, float, int]


class LedgerError(Exception):
    """The ledger file cannot be trusted (corrupt, foreign or unreadable)."""


class BudgetExceeded(Exception):
    """Training would push the cumulative epsilon over the hospital's budget."""

    def __init__(self, spent: float, would_be: float, budget: float) -> None:
        self.spent = spent
        self.would_be = would_be
        self.budget = budget
        super().__init__(
            f"privacy budget exceeded: epsilon spent {spent:.4f}, this round would make it "
            f"{would_be:.4f}, budget {budget:.4f}; refusing to train"
        )


@dataclass(frozen=True)
class LedgerEntry:
    """One training run. ``epsilon_*`` are at the ledger's delta, by ``accountant``."""

    job_id: str
    round: int
    attempt: int
    dp_enabled: bool
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float
    epsilon_cumulative: float
    timestamp: float
    # True when the operator stopped the run part way (Ctrl-C, SIGTERM): only the steps
    # taken are charged, once, and no update left the hospital. Absent in older files.
    abandoned: bool = False
    # True when the run's update went to the server only masked (secure aggregation,
    # issue 12): the server saw it only inside the sum. Absent in older files.
    secure_aggregation: bool = False

    @property
    def mechanism(self) -> Mechanism:
        """The accountant history item of this run."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


# --- accounting ------------------------------------------------------------------------


def merge_history(history: Sequence[Mechanism]) -> tuple[Mechanism, ...]:
    """Items with equal (noise_multiplier, sample_rate) merged by adding their steps,
    in first-seen order; items with no steps dropped.

    Exact for both accountants (composition is commutative, and a mechanism repeated
    k times is one k-fold self-composition), and it keeps a long ledger cheap: the
    PRV accountant's cost grows with the number of distinct mechanisms, not rounds.
    """
    merged: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, steps in history:
        if steps > 0:
            key = (float(noise_multiplier), float(sample_rate))
            merged[key] = merged.get(key, 0) + int(steps)
    return tuple((nm, q, steps) for (nm, q), steps in merged.items())


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one step of the subsampled Gaussian at its default orders."""
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_ALPHAS)
    )
    out = np.asarray(curve, dtype=float)
    out.setflags(write=False)
    return out


def _rdp_of(history: Sequence[Mechanism], delta: float) -> float:
    """What ``RDPAccountant(history).get_epsilon(delta)`` returns, from cached curves."""
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(nm, q) * steps for nm, q, steps in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(_ALPHAS), rdp=rdp, delta=delta)
    return float(eps)


class _PRVGridTooLarge(Exception):
    pass


class _PRVAccountant(PRVAccountant):  # type: ignore[misc]  # opacus ships no type hints
    """Opacus's PRV accountant, with its grid bound taken from the cached RDP curves.

    ``_get_domain`` is Opacus's own (``compute_safe_domain_size`` then an aligned
    mesh of ``eps_error / sqrt(steps * log(12 / delta_error) / 2)``); only the RDP
    epsilons it needs come from ``_rdp_of``, which returns the same numbers as
    Opacus's ``RDPAccountant`` without recomputing a curve per call. A grid over
    ``PRV_MAX_GRID_POINTS`` (memory and minutes) is refused so the caller can fall
    back to RDP.
    """

    def _get_domain(self, prvs: Any, num_self_compositions: Any, eps_error: float,
                    delta_error: float) -> Domain:
        total = sum(num_self_compositions)
        mechanisms = [(p.noise_multiplier, p.sample_rate, n)
                      for p, n in zip(prvs, num_self_compositions, strict=True)]
        bound = _rdp_of(mechanisms, delta_error / 4)
        for nm, q, _ in mechanisms:
            bound = max(bound, _rdp_of([(nm, q, 1)], delta_error / (8 * total)))
        half_width = max(bound, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        points = 2 * half_width / mesh_size * len(mechanisms)
        if not math.isfinite(points) or points > PRV_MAX_GRID_POINTS:
            raise _PRVGridTooLarge(f"{points:.3g} grid points")
        return Domain.create_aligned(-half_width, half_width, mesh_size)


def rdp_epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of composing ``history`` with Opacus's RDP accountant."""
    return _epsilon(merge_history(history), float(delta), "rdp")


def prv_epsilon(history: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of composing ``history`` with Opacus's PRV accountant
    (its upper bound at ``eps_error=PRV_EPS_ERROR``), never above the RDP figure."""
    return _epsilon(merge_history(history), float(delta), "prv")


def compose_epsilon(history: Sequence[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of ``history`` by ``accountant`` (one of ``ACCOUNTANTS``)."""
    check_accountant(accountant)
    return _epsilon(merge_history(history), float(delta), accountant)


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


@functools.lru_cache(maxsize=1024)
def _epsilon(merged: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """Cached on the merged history: a ledger asks for the same total many times."""
    if not merged:
        return 0.0
    rdp = _rdp_of(merged, delta)
    if accountant == "rdp":
        return rdp
    prv = _PRVAccountant()
    prv.history = list(merged)
    try:
        # A sample rate of 1 takes log(1 - q) = log(0) inside Opacus's PRV on purpose.
        with np.errstate(divide="ignore"):
            eps = float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (_PRVGridTooLarge, ValueError, FloatingPointError, OverflowError, MemoryError):
        return rdp
    finally:
        release_fft_plans()
    return min(eps, rdp) if math.isfinite(eps) else rdp


def release_fft_plans() -> None:
    """Drops the FFT plans PRV's composition leaves behind in scipy.fft.

    Why: scipy.fft (pocketfft) keeps the plans of the last 16 transform lengths per
    kind, process-wide and with no call to clear them, and a plan holds twiddle factors
    the size of its transform. PRV's grid (up to PRV_MAX_GRID_POINTS) changes length as
    the ledger grows, so a hospital daemon on the default accountant kept 16 plans of its
    latest grids: its RSS rose by MBs a round, to GBs within a few hundred rounds.
    Transforms of PRV_FFT_PLANS_EVICTED tiny lengths take every slot instead."""
    for n in range(2, PRV_FFT_PLANS_EVICTED + 2):
        scipy.fft.rfft(np.zeros(n))
        scipy.fft.fft(np.zeros(n, dtype=np.complex128))


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")


class PrivacyLedger:
    """The on-disk epsilon ledger of one client (``state_dir/privacy_ledger_<id>.json``)."""

    def __init__(
        self, state_dir: Path, client_id: str, total_epsilon_budget: float, delta: float,
        accountant: str = DEFAULT_ACCOUNTANT,
    ) -> None:
        if not _CLIENT_ID_RE.match(client_id):
            raise ValueError(f"client_id {client_id!r} is not usable in a file name")
        if not (math.isfinite(total_epsilon_budget) and total_epsilon_budget >= 0):
            raise ValueError(f"total_epsilon_budget must be finite and >= 0, got "
                             f"{total_epsilon_budget!r}")
        if not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.state_dir = Path(state_dir)
        self.client_id = client_id
        self.total_epsilon_budget = float(total_epsilon_budget)
        self.delta = float(delta)
        self.accountant = check_accountant(accountant)
        self.path = self.state_dir / f"privacy_ledger_{client_id}.json"
        self._lock_path = self.state_dir / f".privacy_ledger_{client_id}.lock"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._read_version = LEDGER_VERSION  # the file's, once read
        self._entries: list[LedgerEntry] = self._load()

    # --- queries ----------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every recorded run, oldest first (a copy)."""
        return list(self._entries)

    def history(self, job_id: str | None = None) -> list[Mechanism]:
        """The accountant history of every private run (of ``job_id`` only, if given)."""
        return [e.mechanism for e in self._entries
                if e.dp_enabled and (job_id is None or e.job_id == job_id)]

    def epsilon(self, history: Sequence[Mechanism]) -> float:
        """``history`` composed by this ledger's accountant at its delta."""
        return compose_epsilon(history, self.delta, self.accountant)

    def spent(self) -> float:
        """Cumulative epsilon of all private runs so far, at the ledger's delta."""
        return self.epsilon(self.history())

    def would_spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Cumulative epsilon if one more run with these parameters were recorded."""
        _check_mechanism(noise_multiplier, sample_rate, steps)
        return self.epsilon([*self.history(), (noise_multiplier, sample_rate, steps)])

    def remaining(self) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.total_epsilon_budget - self.spent())

    def non_private_runs(self) -> int:
        """How many runs trained without DP (data the guarantee does not cover)."""
        return sum(1 for e in self._entries if not e.dp_enabled)

    def ensure_budget(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise ``BudgetExceeded`` unless such a run fits; return the would-be total."""
        would_be = self.would_spend(noise_multiplier, sample_rate, steps)
        if would_be > self.total_epsilon_budget:
            raise BudgetExceeded(self.spent(), would_be, self.total_epsilon_budget)
        return would_be

    # --- recording --------------------------------------------------------------

    def record(
        self,
        job_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        dp_enabled: bool = True,
        abandoned: bool = False,
    ) -> LedgerEntry:
        """Append one training run and persist it before returning.

        ``abandoned``: the run was stopped part way; ``steps`` are the steps it took
        (they consumed privacy), recorded once like any other run.

        Never refuses for budget: by the time a run is recorded the spend has
        happened, and forgetting it would be the real failure. ``attempt`` is one
        more than the runs already recorded for ``(job_id, round)``.
        """
        if dp_enabled:
            _check_mechanism(noise_multiplier, sample_rate, steps)
        elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        with self._locked():
            # Another process may have recorded since we loaded: start from disk.
            self._entries = self._load()
            attempt = 1 + sum(1 for e in self._entries if (e.job_id, e.round) == (job_id, round))
            history = self.history()
            if dp_enabled:
                eps_round = self.epsilon([(noise_multiplier, sample_rate, steps)])
                history.append((noise_multiplier, sample_rate, steps))
            else:
                eps_round = 0.0
            entry = LedgerEntry(
                job_id=job_id,
                round=int(round),
                attempt=attempt,
                dp_enabled=dp_enabled,
                accountant=self.accountant,
                noise_multiplier=float(noise_multiplier) if dp_enabled else 0.0,
                sample_rate=float(sample_rate),
                steps=steps,
                epsilon_round=eps_round,
                epsilon_cumulative=self.epsilon(history),
                timestamp=time.time(),
                abandoned=abandoned,
            )
            entries = [*self._entries, entry]
            self._keep_old_version()
            self._write(entries)
            self._entries = entries
        return entry

    def mark_secure(self, job_id: str, round: int) -> None:
        """Records that the latest run of (job_id, round) is sent securely aggregated;
        it changes no figure, only what the entry says about how the update left."""
        with self._locked():
            entries = self._load()
            for i in range(len(entries) - 1, -1, -1):
                if (entries[i].job_id, entries[i].round) == (job_id, round):
                    entries[i] = replace(entries[i], secure_aggregation=True)
                    self._keep_old_version()
                    self._write(entries)
                    break
            self._entries = entries

    # --- persistence ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> list[LedgerEntry]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {exc}") from exc
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt ({exc}); refusing to start from zero. "
                "Restore it from backup; do not delete it unless you accept losing the record "
                "of epsilon already spent."
            ) from exc
        return self._parse(doc)

    def _parse(self, doc: Any) -> list[LedgerEntry]:
        where = f"privacy ledger {self.path}"
        if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{where} is not a privacy ledger")
        version = doc.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise LedgerError(f"{where} has unsupported version {version!r}")
        if doc.get("client_id") != self.client_id:
            raise LedgerError(
                f"{where} belongs to client {doc.get('client_id')!r}, not {self.client_id!r}"
            )
        # Version 1 composed with RDP only; version 2 names the accountant used last
        # (the history composes with either, so a ledger may switch).
        allowed = ("rdp",) if version == 1 else ACCOUNTANTS
        if doc.get("accountant") not in allowed:
            raise LedgerError(f"{where} uses accountant {doc.get('accountant')!r}")
        if doc.get("delta") != self.delta:
            raise LedgerError(
                f"{where} was kept at delta={doc.get('delta')!r}, not {self.delta!r}; epsilons "
                "at different deltas cannot be compared, so keep the original delta"
            )
        items = doc.get("entries")
        if not isinstance(items, list):
            raise LedgerError(f"{where} has no entry list")
        self._read_version = int(version)
        return [self._parse_entry(i, item, where, int(version)) for i, item in enumerate(items)]

    @staticmethod
    def _parse_entry(index: int, item: Any, where: str, version: int) -> LedgerEntry:
        spec: dict[str, tuple[type, ...]] = {
            "job_id": (str,),
            "round": (int,),
            "attempt": (int,),
            "dp_enabled": (bool,),
            "accountant": (str,),
            "noise_multiplier": (int, float),
            "sample_rate": (int, float),
            "steps": (int,),
            "epsilon_round": (int, float),
            "epsilon_cumulative": (int, float),
            "timestamp": (int, float),
            "abandoned": (bool,),
            "secure_aggregation": (bool,),
        }
        if isinstance(item, dict) and "abandoned" not in item:
            item = {**item, "abandoned": False}  # written before runs could be abandoned
        if isinstance(item, dict) and "secure_aggregation" not in item:
            item = {**item, "secure_aggregation": False}  # written before issue 12
        if version == 1 and isinstance(item, dict) and "accountant" not in item:
            item = {**item, "accountant": "rdp"}  # version 1 kept RDP figures only
        if not isinstance(item, dict) or set(item) != set(spec):
            raise LedgerError(f"{where}: entry {index} does not have the expected fields")
        for name, types in spec.items():
            value = item[name]
            bad_bool = isinstance(value, bool) and bool not in types
            if bad_bool or not isinstance(value, types):
                raise LedgerError(f"{where}: entry {index} field {name!r} is {value!r}")
        if item["accountant"] not in ACCOUNTANTS:
            raise LedgerError(f"{where}: entry {index} has accountant {item['accountant']!r}")
        entry = LedgerEntry(**item)
        if entry.dp_enabled:
            try:
                _check_mechanism(entry.noise_multiplier, entry.sample_rate, entry.steps)
            except ValueError as exc:
                raise LedgerError(f"{where}: entry {index}: {exc}") from exc
        return entry

    def _keep_old_version(self) -> None:
        """Before a version-1 file is first rewritten as version 2, keep it beside
        (``.v1.json``): an auditor may want the file exactly as the old code wrote it."""
        if self._read_version == LEDGER_VERSION:
            return
        old = self.path.with_name(f"{self.path.stem}.v{self._read_version}.json")
        if not old.exists():
            shutil.copy2(self.path, old)
        self._read_version = LEDGER_VERSION

    def _write(self, entries: list[LedgerEntry]) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "total_epsilon_budget": self.total_epsilon_budget,
            "entries": [asdict(e) for e in entries],
        }
        data = json.dumps(doc, indent=2, allow_nan=False).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
