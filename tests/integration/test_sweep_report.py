"""The privacy-utility sweep's summary and picture from known runs (the runs themselves
are the real demo; test_demo_e2e covers one)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from fl_demo.demo import parse_all
from fl_demo.settings import DemoSettings
from fl_demo.sweep import plot_sweep, print_sweep, summarise


def run(eps: float | None, seed: int, acc: float, alone: float) -> dict[str, object]:
    return {"epsilon_per_hospital": eps, "seed": seed,
            "global": {"accuracy": acc, "auroc": acc + 0.02},
            "local_only": {"hospital_1": {"accuracy": alone, "auroc": alone}},
            "max_epsilon_spent": None if eps is None else eps * 0.99,
            "reference": None, "second_metric": "auroc"}


def test_means_per_budget_and_a_picture(tmp_path: Path) -> None:
    runs = [run(1.0, 0, 0.80, 0.7), run(1.0, 1, 0.84, 0.72), run(3.0, 0, 0.90, 0.75),
            run(3.0, 1, 0.92, 0.77), run(None, 0, 0.95, 0.8)]
    summary = summarise(DemoSettings(), runs)
    points = {p["label"]: p for p in summary["points"]}
    assert points.keys() == {"1", "3", "inf"}
    assert points["1"]["global"]["accuracy"] == pytest.approx(0.82)
    assert points["3"]["local_only"]["hospital_1"]["accuracy"] == pytest.approx(0.76)
    assert points["3"]["max_epsilon_spent"] == pytest.approx(2.97)
    assert points["inf"]["epsilon_per_hospital"] is None
    json.dumps(summary, allow_nan=False)  # report-safe
    out = io.StringIO()
    print_sweep(summary, out)
    assert "0.820" in out.getvalue() and "inf" in out.getvalue()
    png = tmp_path / "report.png"
    plot_sweep(summary, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_sweep_flags() -> None:
    settings, sweep, seeds = parse_all(["--sweep_epsilon", "1,3,inf", "--seeds", "0,2"])
    assert sweep is not None and sweep[:2] == [1.0, 3.0] and math.isinf(sweep[2])
    assert seeds == [0, 2] and settings.epsilon_per_hospital == 3.0
    with pytest.raises(SystemExit):
        parse_all(["--sweep_epsilon", "0,3"])  # epsilon must be positive
    with pytest.raises(ValueError, match="--seeds"):
        parse_all(["--seeds", "0,1"])
    with pytest.raises(ValueError, match="alternatives"):
        parse_all(["--epsilon", "3", "--noise_multiplier", "1.0"])
