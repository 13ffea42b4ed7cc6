"""Keys and data for the secure-aggregation tests over real processes, and helpers
that start the server and hospital doubles (tests/secagg/server_double.py,
client_double.py) the way fl_demo's launcher starts the real daemons."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fl_demo.launcher import Federation, LaunchError, make_pki, site_keys
from fl_models.registry import get_task

HOSPITALS = tuple(f"hospital_{i}" for i in range(1, 6))


@pytest.fixture(scope="session")
def secagg_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secagg-pki")
    make_pki(root, list(HOSPITALS))
    return root


@pytest.fixture(scope="session")
def bc_data(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """breast_cancer split for 3 and for 5 hospitals."""
    out = {}
    for n in (3, 5):
        folder = tmp_path_factory.mktemp(f"bc{n}") / "breast_cancer"
        get_task("breast_cancer").prepare(folder, clients=n, alpha=None, seed=7)
        out[n] = folder
    return out


@pytest.fixture(scope="session")
def glaucoma_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic glaucoma split for 3 hospitals (400 photographs in all, about
    85 to train on per hospital): the image model's parity run stays cheap."""
    folder = tmp_path_factory.mktemp("glaucoma3") / "glaucoma"
    get_task("glaucoma", samples=400).prepare(folder, clients=3, alpha=None, seed=7)
    return folder


@pytest.fixture(scope="session")
def symptom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """symptom split for 3 hospitals: its MLP has ~5k parameters, enough coordinates
    for the statistics on what the server holds (breast_cancer's model has 62)."""
    folder = tmp_path_factory.mktemp("symptom3") / "symptom"
    get_task("symptom").prepare(folder, clients=3, alpha=None, seed=7)
    return folder


@pytest.fixture()
def secfed(secagg_pki: Path, tmp_path: Path) -> Iterator[Federation]:
    work = tmp_path / "fed"
    shutil.copytree(secagg_pki, work)
    fed = Federation(work, [], "breast_cancer")
    try:
        yield fed
    finally:
        fed.stop_all()


def start_server_double(fed: Federation, extra: Sequence[str], double: str,
                        timeout_s: float = 60.0) -> int:
    """Like Federation.start_server, with tests.secagg.server_double in its place."""
    ready = fed.workdir / "server.ready"
    ready.unlink(missing_ok=True)
    args = ["-m", "tests.secagg.server_double", "--host", "127.0.0.1", "--port", "0",
            "--keys_dir", str(fed.workdir / "keys"),
            "--state_dir", str(fed.workdir / "server_state"),
            "--model_type", fed.model_type, "--ready_file", str(ready), *extra]
    fed.server = fed._spawn(args, "server.log", {"FL_SECAGG_DOUBLE": double})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            fed.port = int(json.loads(ready.read_text())["port"])
            return fed.port
        if fed.server.poll() is not None:
            raise LaunchError("server double exited:\n" + fed.tail("server.log"))
        time.sleep(0.05)
    raise LaunchError("server double not ready:\n" + fed.tail("server.log"))


def start_client_double(fed: Federation, name: str, data_path: Path, plain_dir: Path,
                        extra: Sequence[str] = ()) -> None:
    """Like Federation.start_client, with tests.secagg.client_double in its place."""
    args = ["-m", "tests.secagg.client_double", "--client_id", name,
            "--server_url", f"127.0.0.1:{fed.port}", "--data_path", str(data_path),
            "--model_type", fed.model_type, "--keys_dir", str(site_keys(fed.workdir, name)),
            "--state_dir", str(fed.workdir / "sites" / name / "state"), *extra]
    fed.clients[name] = fed._spawn(args, f"{name}.log", {"FL_SECAGG_PLAIN_DIR": str(plain_dir)})
