"""Well-sealed streams whose *content* is hostile, and round-state abuse: updates
that do not fit the global model, non-finite or oversized tensors, lying hashes,
updates sent twice, too late or by a client that was not selected, and absurd
numbers in reports. Each case runs in a frozen round (conftest.Arena.frozen_round)."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import pytest
import torch

from fl_core.tensor_codec import build_manifest
from fl_proto import aggregator_pb2 as apb
from fl_proto import coordinator_pb2 as cpb
from tests.hostile.kit import HostileClient, SealedUpload, refused
from tests.hostile.live.arena import BYSTANDER, EVIL, Arena, Frozen

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
State = dict[str, torch.Tensor]


def zeros(evil: HostileClient, frozen: Frozen) -> State:
    return evil.zero_delta(frozen.evil_task)


def first(state: State) -> str:
    return next(iter(state))


def renamed(state: State) -> State:
    name = first(state)
    return {("evil." + name if n == name else n): t for n, t in state.items()}


def missing(state: State) -> State:
    return dict(list(state.items())[1:])


def extra(state: State) -> State:
    return {**state, "backdoor.weight": torch.zeros(4, 4)}


def retyped(state: State) -> State:
    name = first(state)
    return {n: (t.double() if n == name else t) for n, t in state.items()}


def reshaped(state: State) -> State:
    name = first(state)
    return {n: (torch.zeros(t.shape[0] + 1, *t.shape[1:]) if n == name else t)
            for n, t in state.items()}


def transposed(state: State) -> State:
    name = next(n for n, t in state.items() if t.dim() == 2 and t.shape[0] != t.shape[1])
    return {n: (t.t().contiguous() if n == name else t) for n, t in state.items()}


def poisoned(value: float) -> Callable[[State], State]:
    def make(state: State) -> State:
        name = first(state)
        out = {n: t.clone() for n, t in state.items()}
        out[name].view(-1)[3] = value
        return out
    return make


MANIFEST_CASES: dict[str, tuple[Callable[[State], State], str]] = {
    "tensor_renamed": (renamed, "MANIFEST_MISMATCH"),
    "tensor_missing": (missing, "MANIFEST_MISMATCH"),
    "extra_tensor": (extra, "MANIFEST_MISMATCH"),
    "dtype_differs": (retyped, "MANIFEST_MISMATCH"),
    "shape_differs": (reshaped, "MANIFEST_MISMATCH"),
    "shape_transposed": (transposed, "MANIFEST_MISMATCH"),
    "nan": (poisoned(math.nan), "NON_FINITE"),
    "positive_inf": (poisoned(math.inf), "NON_FINITE"),
    "negative_inf": (poisoned(-math.inf), "NON_FINITE"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_update_that_does_not_fit_or_is_not_finite(arena: Arena, evil: HostileClient,
                                                   case: str) -> None:
    bend, detail = MANIFEST_CASES[case]
    with arena.frozen_round(evil) as frozen:
        up = evil.sealed(frozen.evil_task, bend(zeros(evil, frozen)), chunk_size=512)
        refusal = refused(lambda: evil.submit(up.messages()))
        assert (refusal.code, refusal.detail_code) == (INVALID, detail), refusal


def test_tensor_far_larger_than_declared(arena: Arena, evil: HostileClient) -> None:
    """The manifest is the model's; the final chunk then carries 4 MiB more than the
    manifest leaves for it (sealed correctly, so only the length betrays it)."""
    with arena.frozen_round(evil) as frozen:
        up = evil.sealed(frozen.evil_task, zeros(evil, frozen), chunk_size=512)
        last = len(up.chunks) - 1
        bloated = up.seal(last, b"\x00" * (4 << 20), True)
        refusal = refused(lambda: evil.submit([*up.messages()[:-1], bloated]))
        assert (refusal.code, refusal.detail_code) == (INVALID, "STREAM_OVERSIZE"), refusal


def test_manifest_declaring_a_terabyte(arena: Arena, evil: HostileClient) -> None:
    """Right names, dtypes and shapes, but byte lengths that do not add up (a terabyte):
    refused from the header, before the server allocates or spools anything."""
    with arena.frozen_round(evil) as frozen:
        state = zeros(evil, frozen)
        manifest = build_manifest(state, chunk_size=512)
        manifest.tensors[0].byte_length = 1 << 40
        manifest.total_bytes = sum(t.byte_length for t in manifest.tensors)
        manifest.chunk_count = -(-manifest.total_bytes // manifest.chunk_size)
        up = evil.sealed(frozen.evil_task, state, chunk_size=512)
        up.header.manifest.CopyFrom(manifest)
        refusal = refused(lambda: evil.submit(up.messages()))
        assert (refusal.code, refusal.detail_code) == (INVALID, "MANIFEST_INVALID"), refusal
        # The honest hospital's own upload of this round may be on the spool meanwhile.
        assert not list((arena.state_dir / "spool").glob(f"*-{EVIL}.spool"))


def test_content_does_not_match_its_hashes(arena: Arena, evil: HostileClient) -> None:
    """A manifest (hashes) of zeros, then chunks of other bytes, sealed correctly."""
    with arena.frozen_round(evil) as frozen:
        state = zeros(evil, frozen)
        lie = evil.sealed(frozen.evil_task, {n: t + 0.25 for n, t in state.items()},
                          manifest=build_manifest(state, chunk_size=512))
        refusal = refused(lambda: evil.submit(lie.messages()))
        assert (refusal.code, refusal.detail_code) == (INVALID, "HASH_MISMATCH"), refusal


def test_huge_finite_update_cannot_corrupt_or_kill_the_job(arena: Arena,
                                                          evil: HostileClient) -> None:
    """Finite values so large that the weighted sum overflows float32: the update is
    well-formed and accepted, but its norm is far above the honest update's (and the
    aggregate would not be finite), so the attempt is not applied and the round is
    retried without the attacker. (It claims the examples it declared at Join: more
    would be refused at the edge.)"""
    with arena.frozen_round(evil) as frozen:
        state = {n: torch.full_like(t, 3e38) for n, t in zeros(evil, frozen).items()}
        up = evil.sealed(frozen.evil_task, state, chunk_size=512, num_examples=100)
        evil.submit(up.messages())
        frozen.expect_attempt = 2


def test_second_update_in_the_same_round(arena: Arena, evil: HostileClient) -> None:
    with arena.frozen_round(evil) as frozen:
        up = evil.sealed(frozen.evil_task, zeros(evil, frozen), chunk_size=512)
        receipt = evil.submit(up.messages())
        assert receipt.sha256 == up.manifest.sha256
        frozen.evil_accepted = True
        again = evil.sealed(frozen.evil_task, zeros(evil, frozen), chunk_size=1024)
        refusal = refused(lambda: evil.submit(again.messages()))
        assert refusal.code == grpc.StatusCode.ALREADY_EXISTS, refusal
        # nor can it resume the finished stream
        refusal = refused(lambda: evil.submit(up.messages()))
        assert refusal.code == grpc.StatusCode.ALREADY_EXISTS, refusal


def test_update_for_a_closed_round(arena: Arena, evil: HostileClient) -> None:
    with arena.frozen_round(evil) as old:
        stale: SealedUpload = evil.sealed(old.evil_task, zeros(evil, old), chunk_size=512)
    with arena.frozen_round(evil):
        refusal = refused(lambda: evil.submit(stale.messages()))
        assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION, refusal
        refusal = refused(lambda: evil.report_task(old.evil_task, cpb.FAILED))
        assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION, refusal


def test_client_that_was_not_selected(arena: Arena, evil: HostileClient) -> None:
    """A hospital that never opened its task stream is not selected: it can neither
    download the round's model nor send an update for it, even naming a real task."""
    outsider = arena.client(BYSTANDER)
    try:
        outsider.connect()
        outsider.join()
        with arena.frozen_round(evil) as frozen:
            task = frozen.evil_task
            up = outsider.sealed(task, zeros(evil, frozen), chunk_size=512)
            refusal = refused(lambda: outsider.submit(up.messages()))
            assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
            refusal = refused(lambda: outsider.aggregator.FetchModel(
                apb.FetchModelRequest(job_id=task.job_id, round=task.round,
                                      task_id=task.task_id),
                metadata=outsider.metadata(), timeout=10))
            assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
            refusal = refused(lambda: outsider.report_task(task, cpb.FAILED))
            assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, refusal
    finally:
        outsider.close()


def test_fetch_and_upload_status_out_of_bounds(arena: Arena, evil: HostileClient) -> None:
    with arena.frozen_round(evil) as frozen:
        task = frozen.evil_task
        count = task.model_manifest.chunk_count
        refusal = refused(lambda: evil.aggregator.FetchModel(
            apb.FetchModelRequest(job_id=task.job_id, round=task.round, task_id=task.task_id,
                                  resume_from=count + 10**9),
            metadata=evil.metadata(), timeout=10))
        assert refusal.code == grpc.StatusCode.OUT_OF_RANGE, refusal
        refusal = refused(lambda: evil.aggregator.FetchModel(
            apb.FetchModelRequest(job_id="another-job", round=task.round,
                                  task_id=task.task_id),
            metadata=evil.metadata(), timeout=10))
        assert refusal.code == grpc.StatusCode.FAILED_PRECONDITION, refusal
        # someone else's upload is invisible, not just refused
        other = frozen.freezer_task
        refusal = refused(lambda: evil.aggregator.UploadStatus(
            apb.UploadStatusRequest(stream_id=f"{other.job_id}/{other.round}/{other.task_id}"
                                              "/up/x"),
            metadata=evil.metadata(), timeout=10))
        assert refusal.code == grpc.StatusCode.NOT_FOUND, refusal


# --------------------------------------------------------------------------- numbers

# case -> (num_examples, metrics, what the refusal must say)
HEADER_CASES: dict[str, tuple[int, dict[str, float], str]] = {
    "metric_nan": (100, {"loss": math.nan}, "absurd"),
    "metric_inf": (100, {"loss": math.inf}, "absurd"),
    "metric_1e300": (100, {"accuracy": 1e300}, "absurd"),
    "metric_name_injection": (100, {"loss\n' OR 1=1 --": 0.1}, "metric name"),
    "too_many_metrics": (100, {f"m{i}": 0.0 for i in range(1000)}, "too many"),
    "zero_examples": (0, {}, "num_examples"),
    "absurd_examples": (10**15, {}, "num_examples"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_absurd_numbers_in_an_update_header(arena: Arena, evil: HostileClient,
                                            case: str) -> None:
    num_examples, metrics, reason = HEADER_CASES[case]
    with arena.frozen_round(evil) as frozen:
        up = evil.sealed(frozen.evil_task, zeros(evil, frozen), chunk_size=512,
                         num_examples=num_examples, metrics=metrics)
        refusal = refused(lambda: evil.submit(up.messages()))
        assert (refusal.code, refusal.detail_code) == (INVALID, "BAD_VALUE"), refusal
        assert reason in refusal.details, refusal


def report(status: int = cpb.FAILED, reason: str = "hostile test",
           metrics: dict[str, float] | None = None, epsilon_round: float = 0.0,
           epsilon_total: float = 0.0) -> dict[str, object]:
    return {"status": status, "reason": reason, "metrics": metrics or {},
            "epsilon_round": epsilon_round, "epsilon_total": epsilon_total}


REPORT_CASES: dict[str, dict[str, object]] = {
    "metric_nan": report(metrics={"loss": math.nan}),
    "metric_1e300": report(metrics={"loss": 1e300}),
    "negative_epsilon": report(epsilon_total=-1.0),
    "infinite_epsilon": report(epsilon_round=math.inf),
    "reason_of_a_megabyte": report(reason="x" * (1 << 20)),
    "unspecified_status": report(status=cpb.REPORT_STATUS_UNSPECIFIED),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_absurd_values_in_a_report(arena: Arena, evil: HostileClient, case: str) -> None:
    fields = dict(REPORT_CASES[case])
    with arena.frozen_round(evil) as frozen:
        refusal = refused(lambda: evil.report_task(frozen.evil_task, **fields))  # type: ignore[arg-type]
        assert (refusal.code, refusal.detail_code) == (INVALID, "BAD_VALUE"), refusal


def test_join_with_a_bad_key_or_model(arena: Arena) -> None:
    evil = arena.client()
    try:
        evil.connect()
        with arena.frozen_round():
            for public, model, code in (
                    (b"\x00" * 32, "breast_cancer", INVALID),        # low-order point
                    (b"\x01" * 31, "breast_cancer", INVALID),        # wrong length
                    (b"\x09" * 32, "pneumonia", grpc.StatusCode.FAILED_PRECONDITION)):
                request = cpb.JoinRequest(x25519_public_key=public, model_type=model,
                                          num_examples=10)
                refusal = refused(lambda r=request: evil.coordinator.Join(r, timeout=10))
                assert refusal.code == code, (public, model, refusal)
    finally:
        evil.close()
