"""The simulation's hospitals trained on a GPU (`--gpus_per_hospital`): skipped where
torch sees no CUDA device, so CI skips it; `bench/cuda_check.sh` runs it on a GPU
machine. Two workers share one GPU (half each), and the same study run on the CPU
must account the same privacy for every hospital: the DP steps, sample rates and
noise do not depend on the device, only the noise's draws do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.sim.conftest import RAY_SMALL, load_report, run_sim

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

STUDY = ["--hospitals", "4", "--rounds", "2", "--local_epochs", "1", "--epsilon_budget", "50",
         "--seed", "5", *RAY_SMALL]


def _run(out: Path, extra: list[str]) -> tuple[dict[str, Any], str]:
    result = run_sim([*STUDY, "--out", str(out), *extra], timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return load_report(out), result.stdout


def test_hospitals_train_on_a_shared_gpu_and_account_as_on_the_cpu(tmp_path: Path) -> None:
    gpu, said = _run(tmp_path / "gpu", ["--gpus_per_hospital", "0.5"])
    cpu, _ = _run(tmp_path / "cpu", [])
    name = torch.cuda.get_device_name(0)
    assert gpu["simulation"]["worker_devices"] == [f"cuda ({name})"]
    assert f"workers train on cuda ({name})" in said
    assert gpu["simulation"]["workers"] == 2  # two halves of the one GPU
    assert cpu["simulation"]["worker_devices"] == ["cpu"]
    for report in (gpu, cpu):
        attempts = report["simulation"]["attempts"]
        assert [a["round"] for a in attempts if a["state"] == "completed"] == [1, 2]
        assert all(not a["failures"] for a in attempts), attempts
        assert all(r["metrics"]["eval_accuracy"] > 0.5 for r in report["rounds"])
    assert set(gpu["epsilon"]) == set(cpu["epsilon"]) and len(gpu["epsilon"]) == 4
    for hospital, spent in cpu["epsilon"].items():
        assert 0 < spent <= 50
        assert gpu["epsilon"][hospital] == pytest.approx(spent, rel=1e-9), hospital
