"""When a certificate file expires, for both daemons' metrics: parsed once per file
version (keyed by mtime), so a scrape every few seconds does not re-parse every
certificate in the keys folder."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509


class ExpiryCache:
    def __init__(self) -> None:
        self._seen: dict[Path, tuple[float, float]] = {}

    def expiry(self, path: Path) -> float | None:
        """Unix time `path`'s certificate expires; None when it is missing or unreadable."""
        try:
            mtime = path.stat().st_mtime
            cached = self._seen.get(path)
            if cached and cached[0] == mtime:
                return cached[1]
            when = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
        except (OSError, ValueError):
            return None
        self._seen[path] = (mtime, when.timestamp())
        return when.timestamp()
