"""A hospital's persistent record of the differential-privacy budget it has spent.

Why it exists: local DP only protects patients if the *total* privacy loss over
every round the hospital ever trained stays bounded. The server cannot be trusted
to keep that count, and a daemon restart must not forget it, so each client keeps
its own ledger on disk and refuses to train once the next round would push the
total over the operator's budget.

How the total is computed: rounds are composed with Opacus's RDP accountant, by
handing it the history of every round as ``(noise_multiplier, sample_rate, steps)``
and asking for epsilon at the ledger's delta. RDP composes by adding Renyi
divergences per order before converting to (epsilon, delta) once, which is far
tighter than adding the per-round epsilons (the naive sum is an upper bound that
wastes budget).

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
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

LEDGER_FORMAT = "fl-privacy-ledger"
LEDGER_VERSION = 1
ACCOUNTANT = "rdp"

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    """One training run. ``epsilon_*`` are at the ledger's delta."""

    job_id: str
    round: int
    attempt: int
    dp_enabled: bool
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_round: float
    epsilon_cumulative: float
    timestamp: float

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """The accountant history item of this run."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of composing ``history`` with Opacus's RDP accountant.

    Items with equal (noise_multiplier, sample_rate) are merged by adding their
    steps first: RDP is linear in steps, so this is exact and keeps a long ledger
    cheap to re-evaluate.
    """
    merged: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, steps in history:
        if steps > 0:
            key = (float(noise_multiplier), float(sample_rate))
            merged[key] = merged.get(key, 0) + int(steps)
    if not merged:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(nm, q, steps) for (nm, q), steps in merged.items()]
    return float(accountant.get_epsilon(delta=delta))


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
        self, state_dir: Path, client_id: str, total_epsilon_budget: float, delta: float
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
        self.path = self.state_dir / f"privacy_ledger_{client_id}.json"
        self._lock_path = self.state_dir / f".privacy_ledger_{client_id}.lock"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._entries: list[LedgerEntry] = self._load()

    # --- queries ----------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every recorded run, oldest first (a copy)."""
        return list(self._entries)

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant history of every private run."""
        return [e.mechanism for e in self._entries if e.dp_enabled]

    def spent(self) -> float:
        """Cumulative epsilon of all private runs so far, at the ledger's delta."""
        return rdp_epsilon(self.history(), self.delta)

    def would_spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Cumulative epsilon if one more run with these parameters were recorded."""
        _check_mechanism(noise_multiplier, sample_rate, steps)
        return rdp_epsilon([*self.history(), (noise_multiplier, sample_rate, steps)], self.delta)

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
    ) -> LedgerEntry:
        """Append one training run and persist it before returning.

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
                eps_round = rdp_epsilon([(noise_multiplier, sample_rate, steps)], self.delta)
                history.append((noise_multiplier, sample_rate, steps))
            else:
                eps_round = 0.0
            entry = LedgerEntry(
                job_id=job_id,
                round=int(round),
                attempt=attempt,
                dp_enabled=dp_enabled,
                noise_multiplier=float(noise_multiplier) if dp_enabled else 0.0,
                sample_rate=float(sample_rate),
                steps=steps,
                epsilon_round=eps_round,
                epsilon_cumulative=rdp_epsilon(history, self.delta),
                timestamp=time.time(),
            )
            entries = [*self._entries, entry]
            self._write(entries)
            self._entries = entries
        return entry

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
        if doc.get("version") != LEDGER_VERSION:
            raise LedgerError(f"{where} has unsupported version {doc.get('version')!r}")
        if doc.get("client_id") != self.client_id:
            raise LedgerError(
                f"{where} belongs to client {doc.get('client_id')!r}, not {self.client_id!r}"
            )
        if doc.get("accountant") != ACCOUNTANT:
            raise LedgerError(f"{where} uses accountant {doc.get('accountant')!r}")
        if doc.get("delta") != self.delta:
            raise LedgerError(
                f"{where} was kept at delta={doc.get('delta')!r}, not {self.delta!r}; epsilons "
                "at different deltas cannot be compared, so keep the original delta"
            )
        items = doc.get("entries")
        if not isinstance(items, list):
            raise LedgerError(f"{where} has no entry list")
        return [self._parse_entry(i, item, where) for i, item in enumerate(items)]

    @staticmethod
    def _parse_entry(index: int, item: Any, where: str) -> LedgerEntry:
        spec: dict[str, tuple[type, ...]] = {
            "job_id": (str,),
            "round": (int,),
            "attempt": (int,),
            "dp_enabled": (bool,),
            "noise_multiplier": (int, float),
            "sample_rate": (int, float),
            "steps": (int,),
            "epsilon_round": (int, float),
            "epsilon_cumulative": (int, float),
            "timestamp": (int, float),
        }
        if not isinstance(item, dict) or set(item) != set(spec):
            raise LedgerError(f"{where}: entry {index} does not have the expected fields")
        for name, types in spec.items():
            value = item[name]
            bad_bool = isinstance(value, bool) and bool not in types
            if bad_bool or not isinstance(value, types):
                raise LedgerError(f"{where}: entry {index} field {name!r} is {value!r}")
        entry = LedgerEntry(**item)
        if entry.dp_enabled:
            try:
                _check_mechanism(entry.noise_multiplier, entry.sample_rate, entry.steps)
            except ValueError as exc:
                raise LedgerError(f"{where}: entry {index}: {exc}") from exc
        return entry

    def _write(self, entries: list[LedgerEntry]) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "client_id": self.client_id,
            "accountant": ACCOUNTANT,
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
