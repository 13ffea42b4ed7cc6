"""The hospital's stored final model: safetensors in the model's own order with its
card, read back without pickle; predict's scoring and both export formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_client import predict
from fl_client.model_store import (
    CARD_FILE,
    ModelFileError,
    has_model,
    load_model,
    model_sha256,
    save_final_model,
)
from fl_client.privacy_ledger import PrivacyLedger
from fl_models.registry import get_task
from fl_proto import tensors_pb2 as tpb

DELTA = 1e-5


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("store")
    task = get_task("breast_cancer")
    task.prepare(root / "data", 1, None, 0)
    torch.manual_seed(5)
    state = task.build_model().state_dict()
    ledger = PrivacyLedger(root / "state", "hospital_1", 10.0, DELTA)
    ledger.record("job-1", 1, 1.0, 0.1, 20)
    ledger.record("job-1", 2, 1.0, 0.1, 7, abandoned=True)
    ledger.record("other", 1, 1.0, 0.1, 20)
    path = save_final_model(root / "state", "job-1", 2, "breast_cancer", state, ledger,
                            {"accuracy": 0.5})
    return root, path, state


def test_round_trip_order_hash_and_card(
        stored: tuple[Path, Path, dict[str, torch.Tensor]]) -> None:
    root, path, state = stored
    loaded, meta = load_model(path)
    assert list(loaded) == list(state)  # the model's order, not safetensors' sorted one
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    card = json.loads((path.parent / CARD_FILE).read_text())
    assert card["sha256"] == model_sha256(state) == model_sha256(loaded)
    assert (card["job_id"], card["rounds"], card["model_type"]) == ("job-1", 2, "breast_cancer")
    assert meta["model_type"] == "breast_cancer"
    runs = card["privacy"]["rounds"]
    assert [(r["round"], r["abandoned"], r["steps"]) for r in runs] \
        == [(1, False, 20), (2, True, 7)]  # this job's runs only
    assert has_model(root / "state", "job-1", card["sha256"])
    assert not has_model(root / "state", "job-1", "0" * 64)
    with pytest.raises(ValueError, match="not usable"):
        save_final_model(root / "state", "../x", 1, "breast_cancer", state,
                         PrivacyLedger(root / "state", "hospital_1", 10.0, DELTA), {})


def test_a_model_announced_with_blake3_is_known_by_that_digest(
        stored: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The card keeps the SHA-256 it always had, and the digest the server announced
    (wire_digest), so a repeated STOP naming the model by BLAKE3 finds it stored."""
    _, _, state = stored
    announced = model_sha256(state, tpb.BLAKE3)
    assert announced != model_sha256(state)
    ledger = PrivacyLedger(tmp_path, "hospital_1", 10.0, DELTA)
    path = save_final_model(tmp_path, "job-2", 3, "breast_cancer", state, ledger, {},
                            wire_digest=(tpb.BLAKE3, announced))
    card = json.loads((path.parent / CARD_FILE).read_text())
    assert card["sha256"] == model_sha256(state)
    assert card["wire_digest"] == {"algorithm": "BLAKE3", "value": announced}
    assert has_model(tmp_path, "job-2", announced)
    assert has_model(tmp_path, "job-2", card["sha256"])
    assert not has_model(tmp_path, "job-2", model_sha256({k: v + 1 for k, v in state.items()},
                                                         tpb.BLAKE3))


def test_predict_scores_with_the_tasks_evaluate(
        stored: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root, path, state = stored
    data = root / "data" / "hospital_1"
    out = tmp_path / "p.csv"
    assert predict.main(["--model", str(path), "--data_path", str(data), "--out",
                         str(out)]) == 0
    scored = json.loads(capsys.readouterr().out)
    task = get_task("breast_cancer")
    model = task.build_model()
    model.load_state_dict(state)
    assert scored == pytest.approx(task.evaluate(model, task.load_split(data, "test")),
                                   nan_ok=True)
    assert len(out.read_text().splitlines()) == len(task.load_split(data, "test")) + 1


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_export_both_formats(stored: tuple[Path, Path, dict[str, torch.Tensor]],
                             tmp_path: Path) -> None:
    _, path, state = stored
    st = tmp_path / "copy.safetensors"
    ts = tmp_path / "model.pt"
    assert predict.main(["export", "--model", str(path), "--format", "safetensors",
                         "--out", str(st)]) == 0
    assert model_sha256(load_model(st)[0]) == model_sha256(state)
    assert predict.main(["export", "--model", str(path), "--format", "torchscript",
                         "--out", str(ts)]) == 0
    task, model = predict.load_network(path, None)
    x = torch.randn(4, *task.input_shape)
    scripted = torch.jit.load(str(ts))  # our own file, written just above
    assert torch.allclose(scripted(x), model(x))


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ModelFileError, match="not a safetensors model"):
        load_model(bad)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "missing.safetensors")
    assert predict.main(["--model", str(bad), "--data_path", str(tmp_path),
                         "--model_type", "breast_cancer"]) == 2
