"""Tensor codec: exact round trips, manifest checks, and refusal of bad streams."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_core import tensor_codec as tc
from fl_core.constants import CHUNK_SIZE
from fl_proto import tensors_pb2

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        flat = t.reshape(-1)
        if flat.numel() >= 4:  # the bits of special values must survive too
            flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), -0.0, float("-inf")
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert bits(got[name]) == bits(tensor), name


def assemble(
    state: dict[str, torch.Tensor],
    chunk_size: int = CHUNK_SIZE,
    spool: Path | None = None,
) -> dict[str, torch.Tensor]:
    manifest = tc.build_manifest(state, chunk_size)
    assembler = tc.StreamAssembler(manifest, expected=state, spool_path=spool)
    for sequence, chunk in enumerate(tc.iter_chunks(state, manifest)):
        assembler.add_chunk(sequence, chunk)
    return assembler.finish()


def sample_state() -> dict[str, torch.Tensor]:
    return {
        "a.weight": make_tensor(torch.float32, (3, 5), 1),
        "a.bias": make_tensor(torch.float32, (5,), 2),
        "bn.count": torch.tensor(7, dtype=torch.int64),
        "mask": make_tensor(torch.bool, (9,), 3),
        "half": make_tensor(torch.bfloat16, (2, 3), 4),
    }


# --------------------------------------------------------------------------- round trips

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
tensor_specs = st.tuples(st.sampled_from(tc.SUPPORTED_DTYPES), shapes, st.integers(0, 2**16))
states = st.lists(tensor_specs, min_size=0, max_size=6)


@SETTINGS
@given(
    specs=states,
    chunk_size=st.one_of(st.integers(1, 64), st.just(4096)),
    spool=st.booleans(),
    transpose=st.booleans(),
)
def test_round_trip_exact(
    specs: list[tuple[torch.dtype, tuple[int, ...], int]],
    chunk_size: int,
    spool: bool,
    transpose: bool,
) -> None:
    state = {f"t{i}": make_tensor(d, s, seed) for i, (d, s, seed) in enumerate(specs)}
    if transpose:  # non-contiguous input must be sent in logical (contiguous) order
        state = {k: (v.t() if v.dim() == 2 else v) for k, v in state.items()}
    manifest = tc.build_manifest(state, chunk_size)
    chunks = [bytes(c) for c in tc.iter_chunks(state, manifest)]
    assert len(chunks) == manifest.chunk_count
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert b"".join(chunks) == b"".join(bits(t) for t in state.values())
    with tempfile.TemporaryDirectory() as tmp:
        got = assemble(state, chunk_size, Path(tmp) / "spool" if spool else None)
        assert_same(got, state)
        del got


@SETTINGS
@given(specs=states, chunk_size=st.integers(1, 40), data=st.data())
def test_iter_chunks_from_start(
    specs: list[tuple[torch.dtype, tuple[int, ...], int]], chunk_size: int, data: st.DataObject
) -> None:
    state = {f"t{i}": make_tensor(d, s, seed) for i, (d, s, seed) in enumerate(specs)}
    manifest = tc.build_manifest(state, chunk_size)
    every = [bytes(c) for c in tc.iter_chunks(state, manifest)]
    start = data.draw(st.integers(0, manifest.chunk_count))
    assert [bytes(c) for c in tc.iter_chunks(state, manifest, start)] == every[start:]


def test_dtype_mapping_covers_every_weight_dtype() -> None:
    assert len(tc.SUPPORTED_DTYPES) == 10
    for dtype in tc.SUPPORTED_DTYPES:
        wire = tc.dtype_to_proto(dtype)
        assert tc.dtype_from_proto(wire) is dtype
        assert tc.dtype_itemsize(wire) == torch.empty((), dtype=dtype).element_size()
    with pytest.raises(tc.CodecError) as err:
        tc.dtype_to_proto(torch.complex64, "z")
    assert err.value.code == "UNSUPPORTED_DTYPE" and err.value.field == "z"


def test_unsupported_dtype_refused_naming_tensor() -> None:
    with pytest.raises(tc.CodecError, match="'z'") as err:
        tc.build_manifest({"z": torch.zeros(2, dtype=torch.complex64)})
    assert err.value.code == "UNSUPPORTED_DTYPE"


def test_parameters_with_grad_and_empty_model() -> None:
    layer = torch.nn.Linear(3, 2)
    assert_same(assemble(dict(layer.state_dict(keep_vars=True))), dict(layer.state_dict()))
    manifest = tc.build_manifest({})
    assert manifest.chunk_count == 1 and manifest.total_bytes == 0
    assert [bytes(c) for c in tc.iter_chunks({}, manifest)] == [b""]
    assembler = tc.StreamAssembler(manifest)
    assembler.add_chunk(0, b"")
    assert assembler.finish() == {}


def test_manifest_fields() -> None:
    state = sample_state()
    manifest = tc.manifest_of_state(state, chunk_size=16)
    assert [s.name for s in manifest.tensors] == list(state)
    spec = manifest.tensors[0]
    assert spec.dtype == tensors_pb2.FLOAT32 and list(spec.shape) == [3, 5]
    assert spec.byte_length == 60 and len(spec.sha256) == 32
    assert manifest.total_bytes == sum(s.byte_length for s in manifest.tensors)
    assert manifest.chunk_count == -(-manifest.total_bytes // 16)
    assert manifest.tensors[2].shape == []  # 0-d


def test_inner_chunks_are_views_not_copies() -> None:
    big = torch.arange(64, dtype=torch.float32)
    state = {"big": big, "odd": torch.ones(3, dtype=torch.int8)}
    chunks = list(tc.iter_chunks(state, tc.build_manifest(state, chunk_size=32)))
    assert all(isinstance(c, memoryview) for c in chunks[:-1])
    big[0] = 99.0  # a view sees the tensor's own storage
    assert bytes(chunks[0][:4]) == bits(torch.tensor([99.0]))


def test_tensors_are_views_over_one_buffer() -> None:
    state = {"x": torch.randn(8), "y": torch.randn(4, dtype=torch.float64)}
    got = assemble(state, chunk_size=5)
    assert got["y"].data_ptr() - got["x"].data_ptr() == 32


def test_spooled_tensors_are_copy_on_write(tmp_path: Path) -> None:
    state = {"x": torch.randn(16)}
    got = assemble(state, chunk_size=8, spool=tmp_path / "s")
    assert (tmp_path / "s").read_bytes() == bits(state["x"])
    got["x"].zero_()
    assert (tmp_path / "s").read_bytes() == bits(state["x"])


# --------------------------------------------------------------------------- manifests


def mismatches() -> Iterator[tuple[str, dict[str, torch.Tensor], str]]:
    base = sample_state()
    renamed = dict(base)
    renamed["a.weights"] = renamed.pop("a.weight")
    yield "renamed", renamed, "a.weight"
    yield "dtype", {**base, "a.bias": base["a.bias"].double()}, "a.bias"
    yield "shape", {**base, "a.weight": base["a.weight"].reshape(5, 3)}, "a.weight"
    yield "extra", {**base, "more": torch.zeros(1)}, "more"
    missing = dict(base)
    del missing["mask"]
    yield "missing", missing, "mask"


@pytest.mark.parametrize("case", list(mismatches()), ids=lambda c: c[0])
def test_manifest_mismatch_names_tensor(case: tuple[str, dict[str, torch.Tensor], str]) -> None:
    _, state, field = case
    expected = sample_state()
    manifest = tc.build_manifest(state)
    for against in (expected, tc.build_manifest(expected)):
        with pytest.raises(tc.ManifestMismatch) as err:
            tc.check_manifest(manifest, against)
        assert err.value.field == field and field in str(err.value)
        assert err.value.code == "MANIFEST_MISMATCH"
    with pytest.raises(tc.ManifestMismatch):
        tc.StreamAssembler(manifest, expected=expected)


def test_order_does_not_matter_for_check() -> None:
    state = sample_state()
    reordered = dict(reversed(list(state.items())))
    tc.check_manifest(tc.build_manifest(reordered), state)


def _spec(m: tensors_pb2.TensorManifest, i: int = 0) -> tensors_pb2.TensorSpec:
    return m.tensors[i]


MUTATIONS: dict[str, Callable[[tensors_pb2.TensorManifest], object]] = {
    "byte_length": lambda m: setattr(_spec(m), "byte_length", _spec(m).byte_length + 4),
    "total_bytes": lambda m: setattr(m, "total_bytes", m.total_bytes + 1),
    "chunk_count": lambda m: setattr(m, "chunk_count", m.chunk_count + 1),
    "chunk_size_zero": lambda m: setattr(m, "chunk_size", 0),
    "chunk_size_huge": lambda m: setattr(m, "chunk_size", 8 << 20),
    "duplicate": lambda m: setattr(_spec(m, 1), "name", _spec(m, 0).name),
    "empty_name": lambda m: setattr(_spec(m), "name", ""),
    "negative_dim": lambda m: _spec(m).shape.__setitem__(0, -3),
    "tensor_sha": lambda m: setattr(_spec(m), "sha256", b"short"),
    "stream_sha": lambda m: setattr(m, "sha256", b""),
    "dtype": lambda m: setattr(_spec(m), "dtype", 0),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_inconsistent_manifest_invalid(mutation: str) -> None:
    manifest = tc.build_manifest(sample_state(), chunk_size=16)
    MUTATIONS[mutation](manifest)
    with pytest.raises(tc.ManifestInvalid) as err:
        tc.validate_manifest(manifest)
    assert err.value.code == "MANIFEST_INVALID" and err.value.field
    with pytest.raises(tc.ManifestInvalid):
        tc.StreamAssembler(manifest)


def test_max_total_bytes() -> None:
    manifest = tc.build_manifest({"x": torch.zeros(100)})
    with pytest.raises(tc.ManifestInvalid, match="limit"):
        tc.StreamAssembler(manifest, max_total_bytes=399)
    tc.StreamAssembler(manifest, max_total_bytes=400).close()


# --------------------------------------------------------------------------- bad streams


def stream(
    state: dict[str, torch.Tensor], chunk_size: int = 16
) -> tuple[tensors_pb2.TensorManifest, list[bytes]]:
    manifest = tc.build_manifest(state, chunk_size)
    return manifest, [bytes(c) for c in tc.iter_chunks(state, manifest)]


def test_corrupt_byte_names_tensor() -> None:
    state = sample_state()
    manifest, chunks = stream(state)
    bad = bytearray(chunks[4])
    bad[0] ^= 1  # chunk 4 starts at byte 64: inside "a.bias" (bytes 60..80)
    chunks[4] = bytes(bad)
    assembler = tc.StreamAssembler(manifest)
    for sequence, chunk in enumerate(chunks):
        assembler.add_chunk(sequence, chunk)
    with pytest.raises(tc.IntegrityError) as err:
        assembler.finish()
    assert err.value.code == "HASH_MISMATCH" and err.value.field == "a.bias"


def test_stream_hash_checked() -> None:
    manifest, chunks = stream(sample_state())
    manifest.sha256 = bytes(32)
    assembler = tc.StreamAssembler(manifest)
    for sequence, chunk in enumerate(chunks):
        assembler.add_chunk(sequence, chunk)
    with pytest.raises(tc.IntegrityError) as err:
        assembler.finish()
    assert err.value.field == "sha256"


def test_refused_chunks_change_nothing_and_stream_continues() -> None:
    state = sample_state()
    manifest, chunks = stream(state)
    assembler = tc.StreamAssembler(manifest, expected=state)
    assembler.add_chunk(0, chunks[0])
    with pytest.raises(tc.StreamOrderError) as order:
        assembler.add_chunk(2, chunks[2])  # skipped one
    assert order.value.code == "OUT_OF_ORDER"
    with pytest.raises(tc.StreamOrderError):
        assembler.add_chunk(0, chunks[0])  # replayed
    with pytest.raises(tc.IntegrityError) as short:
        assembler.add_chunk(1, chunks[1][:-1])
    assert short.value.code == "CHUNK_LENGTH"
    with pytest.raises(tc.IntegrityError) as long:
        assembler.add_chunk(1, chunks[1] + b"x")
    assert long.value.code == "STREAM_OVERSIZE"
    assert assembler.next_sequence == 1 and assembler.bytes_received == 16
    for sequence in range(assembler.next_sequence, len(chunks)):  # "reconnect": carry on
        assembler.add_chunk(sequence, chunks[sequence])
    with pytest.raises(tc.IntegrityError) as extra:
        assembler.add_chunk(len(chunks), b"more")
    assert extra.value.code == "STREAM_OVERSIZE"
    assert_same(assembler.finish(), state)
    with pytest.raises(tc.StreamOrderError):
        assembler.add_chunk(len(chunks), b"")


def test_oversize_last_chunk_and_incomplete() -> None:
    manifest, chunks = stream({"x": torch.zeros(5)})  # 20 bytes: 16 + 4
    assembler = tc.StreamAssembler(manifest)
    assembler.add_chunk(0, chunks[0])
    with pytest.raises(tc.IntegrityError) as err:
        assembler.add_chunk(1, chunks[1] + bytes(12))
    assert err.value.code == "STREAM_OVERSIZE"
    with pytest.raises(tc.IntegrityError) as early:
        assembler.finish()
    assert early.value.code == "INCOMPLETE"


def test_bool_bytes_other_than_0_1_refused() -> None:
    manifest, chunks = stream({"m": torch.tensor([0, 1, 2], dtype=torch.uint8)})
    manifest.tensors[0].dtype = tensors_pb2.BOOL  # same size, hashes still match
    assembler = tc.StreamAssembler(manifest)
    assembler.add_chunk(0, chunks[0])
    with pytest.raises(tc.IntegrityError) as err:
        assembler.finish()
    assert err.value.code == "BAD_VALUE" and err.value.field == "m"


def test_memoryview_of_other_format_accepted() -> None:
    state = {"x": torch.arange(6, dtype=torch.float32)}
    manifest = tc.build_manifest(state, chunk_size=24)
    assembler = tc.StreamAssembler(manifest)
    assembler.add_chunk(0, state["x"].numpy().data)
    assert_same(assembler.finish(), state)


# --------------------------------------------------------------------------- spool resume


def test_spool_resume_after_restart(tmp_path: Path) -> None:
    state = sample_state()
    manifest, chunks = stream(state, chunk_size=7)
    path = tmp_path / "upload.spool"
    first = tc.StreamAssembler(manifest, expected=state, spool_path=path)
    for sequence in range(5):
        first.add_chunk(sequence, chunks[sequence])
    first.flush()
    first.close()  # the "process" dies
    assert path.stat().st_size == manifest.total_bytes
    second = tc.StreamAssembler(manifest, expected=state, spool_path=path, resume_at=5)
    assert second.next_sequence == 5 and second.bytes_received == 35
    for sequence in range(5, len(chunks)):
        second.add_chunk(sequence, chunks[sequence])
    assert_same(second.finish(), state)


def test_spool_resume_detects_corrupt_file(tmp_path: Path) -> None:
    state = sample_state()
    manifest, chunks = stream(state, chunk_size=7)
    path = tmp_path / "s"
    with tc.StreamAssembler(manifest, spool_path=path) as first:
        for sequence in range(3):
            first.add_chunk(sequence, chunks[sequence])
    with open(path, "r+b") as handle:
        handle.write(b"\xff")
    resumed = tc.StreamAssembler(manifest, spool_path=path, resume_at=3)
    for sequence in range(3, len(chunks)):
        resumed.add_chunk(sequence, chunks[sequence])
    with pytest.raises(tc.IntegrityError) as err:
        resumed.finish()
    assert err.value.field == "a.weight"


def test_spool_resume_refuses_wrong_file(tmp_path: Path) -> None:
    manifest, _ = stream(sample_state())
    path = tmp_path / "s"
    path.write_bytes(b"short")
    with pytest.raises(tc.CodecError) as err:
        tc.StreamAssembler(manifest, spool_path=path, resume_at=1)
    assert err.value.code == "SPOOL_INVALID" and str(path) in str(err.value)
    with pytest.raises(tc.CodecError):
        tc.StreamAssembler(manifest, resume_at=1)  # nothing to resume from
    os.unlink(path)


# --------------------------------------------------------------------------- values


def test_has_non_finite() -> None:
    state = {
        "ok": torch.ones(3),
        "ints": torch.tensor([1, 2]),
        "bad": torch.tensor([1.0, float("nan")]),
        "worse": torch.tensor([float("inf")], dtype=torch.bfloat16),
    }
    assert tc.has_non_finite(state) == "bad"
    del state["bad"]
    assert tc.has_non_finite(state) == "worse"
    del state["worse"]
    assert tc.has_non_finite(state) is None
