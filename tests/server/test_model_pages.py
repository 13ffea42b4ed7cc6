"""The global model served from its checkpoint file (fl_server/model_pages.py, issue 16
item 3): the same values in the manifest's order, read-only pages that readers drop
and read again unchanged, checkpoints that do not hold the model refused, and the
real daemon serving a large model that way through whole rounds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bench.common import BenchServer, Procs, client_names, make_bench_pki, wait_for
from fl_core.tensor_codec import build_manifest, iter_chunks
from fl_server.model_pages import MappedModel, MappedModelError
from fl_server.store import CHECKPOINT_MODEL_PREFIX, Store

MB = 1 << 20


def model() -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and sizes, not in the checkpoint's (sorted) order."""
    gen = torch.Generator().manual_seed(3)
    return {
        "z.weight": torch.randn(700, 1024, generator=gen),  # ~2.7 MiB
        "a.bias": torch.randn(33, generator=gen),
        "m.steps": torch.tensor([5, 7, 11], dtype=torch.int64),
        "b.half": torch.randn(1000, generator=gen).to(torch.float16),
        "empty": torch.zeros(0),
        "k.mask": torch.tensor([True, False, True]),
    }


def checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    with Store(tmp_path) as store:
        store.create_job("job", "sized", "fedavg", {}, 2)
        store.save_initial_model("job", state)
        return store.recorded_checkpoint("job", 0)


def resident_kb(tensor: torch.Tensor) -> int:
    """Rss of the mapping holding `tensor`, from /proc/self/smaps."""
    address = tensor.data_ptr()
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


def test_the_checkpoint_s_tensors_in_manifest_order(tmp_path: Path) -> None:
    state = model()
    mapped = MappedModel(checkpoint(tmp_path, state), CHECKPOINT_MODEL_PREFIX,
                         build_manifest(state))
    assert list(mapped.state) == list(state)
    for name, tensor in state.items():
        got = mapped.state[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), name
    # the download's chunks are the in-memory model's, byte for byte
    manifest = build_manifest(state, chunk_size=4096)
    assert [bytes(c) for c in iter_chunks(mapped.state, manifest)] == \
        [bytes(c) for c in iter_chunks(state, manifest)]


def test_dropped_pages_leave_memory_and_read_back_the_same(tmp_path: Path) -> None:
    state = model()
    manifest = build_manifest(state)
    mapped = MappedModel(checkpoint(tmp_path, state), CHECKPOINT_MODEL_PREFIX, manifest)
    big = mapped.state["z.weight"]
    assert float(big.sum()) == pytest.approx(float(state["z.weight"].sum()), rel=1e-4)
    assert resident_kb(big) >= 2_500  # read: its pages are mapped
    mapped.release("z.weight")
    assert resident_kb(big) < 200
    assert torch.equal(big, state["z.weight"])  # read again from the page cache
    # a download that has sent the first tensor's bytes drops exactly those
    first = manifest.tensors[0].byte_length
    mapped.release_stream(0, first - 1)  # not all of it yet: kept
    assert resident_kb(big) >= 2_500
    mapped.release_stream(0, first)
    assert resident_kb(big) < 200
    assert float(big.sum()) != 0.0
    mapped.release_all()
    assert resident_kb(big) < 200
    assert all(torch.equal(mapped.state[n], t) for n, t in state.items())


def test_a_checkpoint_that_is_not_the_model_is_refused(tmp_path: Path) -> None:
    state = model()
    path = checkpoint(tmp_path, state)
    other = dict(state, **{"a.bias": torch.randn(34)})  # one shape differs
    with pytest.raises(MappedModelError, match="a.bias"):
        MappedModel(path, CHECKPOINT_MODEL_PREFIX, build_manifest(other))
    retyped = dict(state, **{"m.steps": state["m.steps"].to(torch.int32)})
    with pytest.raises(MappedModelError, match="m.steps"):
        MappedModel(path, CHECKPOINT_MODEL_PREFIX, build_manifest(retyped))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:5])
    with pytest.raises(MappedModelError, match="too short"):
        MappedModel(cut, CHECKPOINT_MODEL_PREFIX, build_manifest(state))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(MappedModelError, match="header length"):
        MappedModel(garbage, CHECKPOINT_MODEL_PREFIX, build_manifest(state))
    for header in (b"[1, 2]", b"\xff{", json.dumps(
            {CHECKPOINT_MODEL_PREFIX + n: {"dtype": "F32", "shape": list(t.shape)}
             for n, t in state.items()}).encode()):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(MappedModelError):  # never a KeyError out of the daemon
            MappedModel(bad, CHECKPOINT_MODEL_PREFIX, build_manifest(state))


def test_the_daemon_serves_a_large_model_from_its_checkpoint(tmp_path: Path) -> None:
    """A model above MAPPED_MODEL_MIN_BYTES (16 MiB) through two real rounds: two
    hospitals download it sealed (each chunk checked against the manifest's digests)
    from the mapped checkpoint, and the server's memory maps the checkpoint files."""
    names = client_names(2)
    make_bench_pki(tmp_path, names)
    procs = Procs()
    try:
        server = BenchServer(procs, tmp_path, 4_500_000, name="mapped",  # 18 MB
                             extra=["--rounds", "2", "--min_clients", "2",
                                    "--wait_for_clients_s", "60", "--round_deadline_s", "90"])
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert re.search(r"round_000000\.safetensors", maps), "the initial model is not mapped"
        status = tmp_path / "light.json"
        clients = procs.start(["-m", "bench.light_clients", "--server", server.target,
                               "--work", str(tmp_path), "--clients", ",".join(names),
                               "--status_file", str(status), "--timeout_s", "150"],
                              tmp_path / "light.log", cwd=tmp_path)

        def done() -> bool:
            rounds = [r for r in server.recorded_rounds() if r[1] == "completed"]
            return len(rounds) >= 2 or not clients.alive()

        wait_for(done, 120, "two rounds", interval_s=0.2)
        assert [r[0] for r in server.recorded_rounds() if r[1] == "completed"] == [1, 2], \
            clients.tail()
        assert clients.wait(30) == 0, clients.tail()
        counts = json.loads(status.read_text())
        assert counts["tasks"] == 4 and counts["failures"] == 0, counts
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert re.search(r"round_000002\.safetensors", maps), "round 2's model is not mapped"
        assert "model_kept_in_memory" not in server.log_path.read_text()
        server.close()
    finally:
        procs.stop_all()
