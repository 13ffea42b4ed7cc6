"""Which hash a transfer's digests use (tensors.proto Digest; issue 16 item 1).

A hospital that declares BLAKE3 at Join is sent models hashed with it and uploads with
it; a hospital from before (it declares nothing) is sent SHA-256 manifests of the same
model and its SHA-256 uploads are taken as always, in the same round. Both manifests
are bound into their streams' keys and checked by the receiver in full."""

from __future__ import annotations

import pytest
import torch

from fl_core.tensor_codec import build_manifest
from fl_proto import tensors_pb2 as tpb
from tests.hostile.kit import HostileClient, checkpoint_state
from tests.hostile.live.arena import Arena

pytestmark = pytest.mark.slow


def test_a_client_from_before_gets_sha256_and_a_current_one_blake3(
        arena: Arena, evil: HostileClient) -> None:
    assert evil.session is not None and evil.session.upload_digest == tpb.BLAKE3
    evil.digests = ()  # as a client built before the choice: declares nothing
    evil.join()
    with arena.frozen_round(evil) as frozen:
        legacy, current = frozen.evil_task, frozen.freezer_task
        assert legacy.model_manifest.digest == tpb.SHA256
        assert current.model_manifest.digest == tpb.BLAKE3
        start = checkpoint_state(arena.state_dir, arena.job_id, frozen.round - 1)
        chunk = legacy.model_manifest.chunk_size
        # each manifest is the model's own, in its algorithm (not merely self-consistent)
        assert legacy.model_manifest == build_manifest(start, chunk, digest=tpb.SHA256)
        assert current.model_manifest == build_manifest(start, chunk, digest=tpb.BLAKE3)
        got = evil.fetch_model(legacy, legacy.model_manifest)  # every SHA-256 checked
        assert got.keys() == start.keys()
        assert all(torch.equal(got[k], start[k]) for k in start)
        # its upload, hashed with SHA-256 as it always was, is taken
        up = evil.sealed(legacy, evil.zero_delta(legacy), chunk_size=512)
        assert up.manifest.digest == tpb.SHA256
        receipt = evil.submit(up.messages())
        assert receipt.sha256 == up.manifest.sha256
        frozen.evil_accepted = True
