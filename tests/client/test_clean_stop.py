"""Issue 15 item 4: a stop between batches abandons the round; the DP steps already
taken are charged to the ledger exactly once, marked abandoned."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_client.local_training import TrainingStopped, train_round
from fl_client.privacy_ledger import PrivacyLedger
from fl_models.registry import get_task
from fl_proto import coordinator_pb2 as pb

CPU = torch.device("cpu")
DELTA = 1e-5


def _config(dp: bool) -> pb.TrainConfig:
    return pb.TrainConfig(local_epochs=3, batch_size=16, seed=3, privacy=pb.PrivacyConfig(
        enabled=dp, noise_multiplier=1.0, delta=DELTA))


@pytest.fixture(scope="module")
def bc_train(tmp_path_factory: pytest.TempPathFactory) -> TensorDataset:
    root = tmp_path_factory.mktemp("bc")
    task = get_task("breast_cancer")
    task.prepare(root, 1, None, 0)
    return task.load_split(root / "hospital_1", "train")


@pytest.mark.parametrize("dp", [True, False])
def test_stop_between_batches_abandons_and_charges_once(
        bc_train: TensorDataset, tmp_path: Path, dp: bool) -> None:
    task = get_task("breast_cancer")
    ledger = PrivacyLedger(tmp_path, "hospital_1", 10.0, DELTA)
    stop = threading.Event()
    seen: list[int] = []

    def progress(epoch: int, total: int, step: int, steps: int, loss: float) -> None:
        seen.append(step)
        if len(seen) == 5:
            stop.set()  # the operator's Ctrl-C, mid-epoch

    with pytest.raises(TrainingStopped) as stopped:
        train_round(task, task.build_model().state_dict(), bc_train, _config(dp), CPU, ledger,
                    allow_no_dp=True, job_id="j", round=2, on_progress=progress, stop=stop,
                    private_seed=1)
    assert stopped.value.steps == 5  # no step after the stop
    entries = PrivacyLedger(tmp_path, "hospital_1", 10.0, DELTA).entries()  # from disk
    assert len(entries) == 1, entries
    entry = entries[0]
    assert (entry.job_id, entry.round, entry.attempt) == ("j", 2, 1)
    if dp:
        # the steps actually taken, charged once, flagged abandoned
        assert entry.abandoned and entry.steps == 5 and entry.epsilon_round > 0
        assert ledger.spent() == pytest.approx(entry.epsilon_cumulative)
    else:
        # a no-DP run is recorded (without epsilon) before it starts, and not again
        assert not entry.dp_enabled and not entry.abandoned


def test_older_ledger_entries_read_as_not_abandoned(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "h", 10.0, DELTA)
    ledger.record("j", 1, 1.0, 0.1, 10)
    doc = json.loads(ledger.path.read_text())
    for item in doc["entries"]:
        del item["abandoned"]
    ledger.path.write_text(json.dumps(doc))
    assert PrivacyLedger(tmp_path, "h", 10.0, DELTA).entries()[0].abandoned is False
