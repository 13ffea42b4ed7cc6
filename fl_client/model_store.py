"""Where a hospital keeps the final model of a job it trained, and how it reads it back.

Layout: ``<state_dir>/models/<job_id>/model.safetensors`` beside ``model_card.json``.
The tensors are written with safetensors (no pickle: the file can be opened by anyone
without running code), in the global model's own order; the file's metadata names the
model type and job so ``python -m fl_client.predict`` needs no other flag. Both files
are written atomically (temporary file, fsync, rename), the model first, so a card
never describes a model that is not there.

The card says what the model is and what it cost this hospital: job, rounds, model
type, the model's SHA-256 (the manifest digest the server announced and the download
was checked against, plus the file's own SHA-256), the hospital's metrics of the model
on its own test split, and each of this job's rounds from its privacy ledger (epsilon
per run, abandoned runs included). The server's strategy and its own final metrics
are not on the wire to a hospital yet (no protobuf field for them), so they are not
in the card.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fl_client.privacy_ledger import PrivacyLedger
from fl_core.identity import write_public
from fl_core.tensor_codec import build_manifest, digest_name
from fl_proto import tensors_pb2 as tpb

MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
CARD_FORMAT = "fl-model-card"
CARD_VERSION = 1
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelFileError(ValueError):
    """A model file that cannot be used (missing, not safetensors, no model type)."""


def model_sha256(state: Mapping[str, torch.Tensor], digest: int = tpb.SHA256) -> str:
    """The model's digest as the wire names it: the manifest digest over each tensor's
    digest in order (what the STOP task announced), with `digest` (tensors.proto
    Digest; the card's `sha256` is always SHA-256's)."""
    return bytes(build_manifest(dict(state), digest=digest).sha256).hex()


def model_dir(state_dir: Path, job_id: str) -> Path:
    if not _JOB_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r} is not usable as a folder name")
    return Path(state_dir) / "models" / job_id


def has_model(state_dir: Path, job_id: str, digest: str) -> bool:
    """True when the job's model with this digest (as announced: SHA-256, or the
    card's `wire_digest`) is already stored (a repeated STOP)."""
    try:
        card = json.loads((model_dir(state_dir, job_id) / CARD_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(card, dict):
        return False
    wire = card.get("wire_digest")
    return card.get("sha256") == digest or (isinstance(wire, dict)
                                            and wire.get("value") == digest)


def save_final_model(state_dir: Path, job_id: str, rounds: int, model_type: str,
                     state: Mapping[str, torch.Tensor], ledger: PrivacyLedger,
                     local_metrics: Mapping[str, float], strategy: str = "",
                     server_metrics: Mapping[str, float] | None = None,
                     wire_digest: tuple[int, str] | None = None) -> Path:
    """Write the model and its card; returns the model file's path. `wire_digest`:
    (algorithm, hex) as the server announced the model, when not SHA-256."""
    folder = model_dir(state_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    model_path = folder / MODEL_FILE
    data = save(tensors, metadata={**file_metadata(tensors, model_type),
                                   "job_id": job_id, "rounds": str(rounds)})
    write_public(model_path, data)  # atomic: temporary file, fsync, rename, fsync folder
    card = {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "job_id": job_id,
        "rounds": rounds,
        "model_type": model_type,
        "sha256": model_sha256(tensors),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        **({"wire_digest": {"algorithm": digest_name(wire_digest[0]), "value": wire_digest[1]}}
           if wire_digest is not None and wire_digest[0] != tpb.SHA256 else {}),
        "client_id": ledger.client_id,
        "received_unix": time.time(),
        "strategy": strategy,
        # the server's record of the last round (its evaluation, train loss, epsilon)
        "server_final_metrics": {k: float(v) for k, v in (server_metrics or {}).items()},
        "local_test_metrics": {k: float(v) for k, v in local_metrics.items()},
        "privacy": privacy_of(ledger, job_id),
    }
    write_public(folder / CARD_FILE, json.dumps(card, indent=2, allow_nan=False).encode())
    return model_path


def privacy_of(ledger: PrivacyLedger, job_id: str) -> dict[str, Any]:
    """The job's runs from the hospital's own ledger, and the job's composed epsilon."""
    runs = [{"round": e.round, "attempt": e.attempt, "dp_enabled": e.dp_enabled,
             "abandoned": e.abandoned, "steps": e.steps, "epsilon_round": e.epsilon_round,
             "epsilon_cumulative": e.epsilon_cumulative}
            for e in ledger.entries() if e.job_id == job_id]
    return {"delta": ledger.delta, "accountant": ledger.accountant,
            "epsilon_job": ledger.epsilon(ledger.history(job_id)),
            "non_private_runs": sum(1 for r in runs if not r["dp_enabled"]),
            "rounds": runs}


def file_metadata(state: Mapping[str, torch.Tensor], model_type: str) -> dict[str, str]:
    """safetensors metadata: the model type, and the tensors' order (safetensors lists
    names sorted, and the model's SHA-256 is over the global model's own order)."""
    return {"format": "fl-final-model", "model_type": model_type,
            "model_order": json.dumps(list(state))}


def load_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors in the model's order, metadata) of a safetensors file; never unpickles."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            order = json.loads(metadata.get("model_order", "null")) or names
            if sorted(order) != sorted(names):
                raise ModelFileError(f"{path}: its model_order does not list its tensors")
            state = {k: f.get_tensor(k) for k in order}
    except ModelFileError:
        raise
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: no such file") from exc
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path} is not a safetensors model: {exc}") from exc
    return state, metadata
