"""deploy/systemd units: `systemd-analyze verify` finds nothing to say about them, and
they keep their hardening. The units name /opt/fl-hospitals/bin; for verify (which
checks that ExecStart exists) that prefix points at this project's virtualenv."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
PREFIX = "/opt/fl-hospitals/bin"
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes", "LockPersonality": "yes", "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service", "UMask": "0077",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}  # fmt: skip
ANALYZE = shutil.which("systemd-analyze")


def _service_section(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return dict(parser["Service"])


def _verify(folder: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", *names], cwd=folder, capture_output=True,
                          text=True, timeout=60)


def _copies(tmp_path: Path) -> list[str]:
    """The units with the install prefix pointing at this virtualenv; the template
    instantiated for a site."""
    bin_dir = str(Path(sys.executable).parent)
    names = []
    for unit in sorted(UNITS.glob("*.service")):
        name = unit.name.replace("@.service", "@hospital_1.service")
        (tmp_path / name).write_text(unit.read_text().replace(PREFIX, bin_dir))
        names.append(name)
    return names


def test_units_exist_and_are_hardened() -> None:
    units = {p.name for p in UNITS.glob("*.service")}
    assert units == {"fl-server.service", "fl-client@.service"}
    for unit in UNITS.glob("*.service"):
        service = _service_section(unit)
        for key, value in HARDENING.items():
            assert service.get(key) == value, f"{unit.name}: {key}={service.get(key)!r}"
        assert PREFIX in service["ExecStart"] and "--log_file" in service["ExecStart"]
        assert service["User"] == "fl" and "2" in service["RestartPreventExitStatus"].split()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    names = _copies(tmp_path)
    for console_script in ("fl-server", "fl-client"):
        assert (Path(sys.executable).parent / console_script).exists(), console_script
    result = _verify(tmp_path, names)
    # verify exits 0 even for lines it ignores; any message at all is a defect
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    names = _copies(tmp_path)
    server = tmp_path / "fl-server.service"
    server.write_text(server.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
    result = _verify(tmp_path, names)
    assert "ProtectSystem" in result.stdout + result.stderr or "protect system" in (
        result.stdout + result.stderr).lower()
