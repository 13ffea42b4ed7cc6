"""The built wheel, installed into a fresh virtualenv, gives working console scripts
without the source tree: what a hospital machine gets from `pip install fl_hospitals-*.whl`.

Kept quick: the wheel is built with --no-deps and no build isolation (no download),
and the fresh virtualenv sees the project's .venv site-packages through a plain path
line in a .pth file (torch and the rest are not reinstalled). A plain path line does
not run the .pth files inside that folder, so the project's editable install (the
source tree) stays invisible; the test checks that the packages come from the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("fl-server", "fl-client", "fl-keys", "fl-admin")
MODULES = ("fl_server.doctor", "fl_client.doctor")
TIMEOUT_S = 300  # a cold `--help` imports torch: tens of seconds on a loaded machine


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its bin folder."""
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"  # build from a copy: no build/ or egg-info left in the shared tree
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for package in REPO.glob("fl_*"):
        if package.is_dir() and (package / "__init__.py").exists():
            shutil.copytree(package, src / package.name, ignore=ignore)
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(wheels), str(src)],
                   check=True, timeout=TIMEOUT_S, capture_output=True)
    (wheel,) = wheels.glob("fl_hospitals-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig;"
                              " print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # Dependencies (torch, grpc, ...) from the project's virtualenv, as a plain path.
    Path(purelib, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=TIMEOUT_S, capture_output=True)
    return env_dir / "bin"


def test_packages_come_from_the_wheel_not_the_tree(installed: Path, tmp_path: Path) -> None:
    probe = ("import fl_core, fl_server, fl_client, fl_models, fl_proto;"
             " print('\\n'.join(m.__file__ for m in (fl_core, fl_server, fl_client, fl_models,"
             " fl_proto)))")
    out = subprocess.run([str(installed / "python"), "-c", probe], cwd=tmp_path,
                         env=_clean_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    venv_root = installed.parent.resolve()
    for path in out.stdout.split():
        assert Path(path).resolve().is_relative_to(venv_root), path


def test_console_scripts_answer_help_outside_the_tree(installed: Path, tmp_path: Path) -> None:
    commands = [[str(installed / script), "--help"] for script in SCRIPTS]
    commands += [[str(installed / "python"), "-m", module, "--help"] for module in MODULES]
    for command in commands:
        assert Path(command[0]).exists(), f"{command[0]} was not installed"

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=tmp_path, env=_clean_env(), capture_output=True,
                              text=True, timeout=TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        results = list(pool.map(run, commands))
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout, command
    by_name = dict(zip(SCRIPTS, results, strict=False))
    assert "--log_file" in by_name["fl-client"].stdout
    assert "--config" in by_name["fl-client"].stdout
    assert "--server_url" in by_name["fl-admin"].stdout
