"""Strategies that need every update at once (median, trimmed mean, Krum) get each
simulated hospital's update as the server's aggregator gives it to them: written to a
spool file in the simulation's state folder by the receiving StreamAssembler and
memory-mapped back, the file unlinked at once; nothing of it stays on the heap."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from fl_proto import coordinator_pb2 as cpb
from fl_server.config import ServerConfig
from fl_server.strategies import make_strategy
from fl_sim.engine import Attempt, Progress, Simulation, spool_update
from fl_sim.worker import OK, HospitalResult


def _global() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(200, 150), "b": torch.zeros(150), "steps": torch.tensor(4)}


def _delta(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(200, 150, generator=gen), "b": torch.randn(150, generator=gen),
            "steps": torch.tensor(4)}


def _mapped(folder: Path) -> list[str]:
    """This process's memory mappings of files in `folder`."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(folder) in line]


def test_a_spooled_update_is_a_mapping_of_an_unlinked_file(tmp_path: Path) -> None:
    delta = _delta(1)
    spooled = spool_update(tmp_path / "one.spool", delta, _global())
    assert not (tmp_path / "one.spool").exists()  # unlinked, as the server's spools are
    assert all(torch.equal(spooled[k], delta[k]) for k in delta)
    maps = _mapped(tmp_path)
    assert maps and all("(deleted)" in line for line in maps)
    del spooled
    gc.collect()
    assert _mapped(tmp_path) == []  # the pages went with the last tensor


def test_the_engine_hands_robust_strategies_spooled_updates(tmp_path: Path) -> None:
    names = [f"hospital_{i}" for i in range(1, 6)]
    strategy = make_strategy("median")
    sim = Simulation(None, [], ServerConfig(strategy="median"), strategy, None,
                     cpb.TrainConfig(), names, "job", 0.0, None,
                     Progress(lambda _: None, 1, 10.0), spool_dir=tmp_path)
    strategy.begin_round(_global())
    record = Attempt(1, 1, "failed", names)
    accepted: dict[str, dict[str, object]] = {}
    deltas = {h: _delta(i) for i, h in enumerate(names)}
    for h in names:
        result = HospitalResult(h, OK, state=dict(deltas[h]), num_examples=10)
        sim._take(result, record, accepted, _global(), None)
        assert result.state == {}  # the driver drops its copy at once
    assert sorted(accepted) == names and not record.failures
    assert list(tmp_path.iterdir()) == []  # no spool file is left behind
    maps = _mapped(tmp_path)
    assert len(maps) == len(names) and all("(deleted)" in line for line in maps)
    new = strategy.finish_round()
    for name in ("w", "b"):
        expected = torch.stack([deltas[h][name] for h in names]).median(dim=0).values
        assert torch.allclose(new[name], expected), name
    assert torch.equal(new["steps"], torch.tensor(4))
    gc.collect()
    assert _mapped(tmp_path) == []  # the strategy let go at the end of the round
