"""No pickle anywhere a peer's or a file's bytes are read: tensors cross the wire as
a manifest plus raw bytes, checkpoints are safetensors, ledgers are JSON. Unpickling
is code execution, so this is checked on the source itself, every run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fl_core", "fl_server", "fl_client", "fl_models", "fl_demo")
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b"  # unpicklers
    r"|torch\.load\("                                                # pickle inside
    r"|allow_pickle\s*=\s*True",                                     # numpy opt-in
    re.MULTILINE,
)


def test_no_unpickling_in_the_product() -> None:
    hits = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            hits += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
                     for m in FORBIDDEN.finditer(text)]
            # numpy's load unpickles unless told not to
            for m in re.finditer(r"np\.load\(([^)]*)\)", text):
                if "allow_pickle=False" not in m.group(1):
                    hits.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not hits, "unpickling found:\n" + "\n".join(hits)
