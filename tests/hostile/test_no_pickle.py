"""No pickle anywhere a peer's or a file's bytes are read: tensors cross the wire as
a manifest plus raw bytes, checkpoints are safetensors, ledgers are JSON. Unpickling
is code execution, so this is checked on the source itself, every run.

The check walks each module's syntax tree (not its text), so spacing, aliases and
`from torch import load` cannot hide a call, and is itself tested on the evasions a
text search missed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
              "marshal"}
# module -> its functions that unpickle unconditionally
UNPICKLING_FUNCTIONS = {"torch": {"load"}, "torch.serialization": {"load"},
                        "pandas": {"read_pickle"}}
NUMPY = {"numpy"}


def product_packages() -> list[Path]:
    """Every top-level fl_* package (a new one is covered without editing this)."""
    return sorted(p.parent for p in ROOT.glob("fl_*/__init__.py")
                  if p.parent.name != "fl_proto")  # generated protobuf code


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def unpickling(source: str, filename: str = "<source>") -> list[str]:
    """Where `source` imports an unpickler or calls one (line: what)."""
    tree = ast.parse(source, filename)
    modules: dict[str, str] = {}  # local name -> module it is bound to
    hits: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLERS:
                    hits.append(f"{node.lineno}: import {alias.name}")
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                hits.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if alias.name in UNPICKLING_FUNCTIONS.get(node.module, set()) or (
                        node.module in NUMPY and alias.name == "load"):
                    hits.append(f"{node.lineno}: from {node.module} import {alias.name}")
                if alias.name in UNPICKLERS:
                    hits.append(f"{node.lineno}: from {node.module} import {alias.name}")
                modules.setdefault(alias.asname or alias.name, f"{node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            module = modules.get(head, head) + (f".{rest}" if rest else "")
            if node.attr in UNPICKLING_FUNCTIONS.get(module, set()):
                hits.append(f"{node.lineno}: {module}.{node.attr}")
        if isinstance(node, ast.Call):
            if _keyword_is(node, "allow_pickle", True):
                hits.append(f"{node.lineno}: allow_pickle=True")
            target = _dotted(node.func)
            if target is None:
                continue
            head, _, rest = target.partition(".")
            resolved = modules.get(head, head) + (f".{rest}" if rest else "")
            if resolved in {"numpy.load"} and not _keyword_is(node, "allow_pickle", False):
                hits.append(f"{node.lineno}: numpy.load without allow_pickle=False")
    return hits


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cPickle as fast",
    "from pickle import loads",
    "import dill.settings",
    "from torch import load",
    "from torch import load as restore",
    "import torch\nstate = torch.load (path)",
    "import torch as t\nt.load(path)",
    "import torch\nreader = torch.load",
    "import torch.serialization\ntorch.serialization.load(f)",
    "from torch import serialization\nserialization.load(f)",
    "import numpy as np\nnp.load(path)",
    "import numpy\nnumpy.load(path, mmap_mode='r')",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "from numpy import load",
    "import pandas as pd\npd.read_pickle(path)",
])
def test_the_scan_finds_each_evasion(source: str) -> None:
    assert unpickling(source), source


@pytest.mark.parametrize("source", [
    "import numpy as np\nnp.load(path, allow_pickle=False)",
    "from safetensors.torch import load_file\nload_file(path)",
    "import json\njson.load(f)",
    "import torch\ntorch.save_not_load = 1\ntorch.frombuffer(b, dtype=torch.uint8)",
])
def test_the_scan_passes_safe_loaders(source: str) -> None:
    assert unpickling(source) == [], source


def test_no_unpickling_in_the_product() -> None:
    packages = product_packages()
    assert {"fl_core", "fl_server", "fl_client", "fl_models", "fl_demo"} <= {
        p.name for p in packages}
    hits = []
    for package in packages:
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(ROOT)
            hits += [f"{rel}:{hit}" for hit in unpickling(path.read_text(encoding="utf-8"),
                                                          str(rel))]
    assert not hits, "unpickling found:\n" + "\n".join(hits)
