"""fl_proto/ is generated and committed: it must be exactly what `make proto` makes
from protos/, so nobody hand-edits it and nobody forgets to regenerate it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_proto_would_not_change_fl_proto(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT, check=True, capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated
    stale = [str(rel) for rel in generated
             if not (ROOT / rel).exists()
             or (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"run `make proto` and commit: these differ from protos/: {stale}"
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "fl_proto").glob("*_pb2*.py*"))
    extra = sorted(set(map(str, committed)) - set(map(str, generated)))
    assert not extra, f"fl_proto/ holds generated files no .proto makes any more: {extra}"
