"""report.json and report.png of a simulation: the demo's report, built by the demo's
own code (`fl_demo.demo.build_report`, `fl_demo.report.plot`), plus what only a
simulation has (the Ray pool, every attempt with its injected dropouts, timings).

The picture draws at most `PLOT_HOSPITALS` hospitals' epsilon curves and label
bars (the first ones by number); report.json has every hospital.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

from fl_demo.demo import DemoState, build_report, describe_data
from fl_demo.live import RoundRow
from fl_demo.report import plot
from fl_demo.settings import DemoSettings
from fl_models.partition import HOSPITAL_PREFIX
from fl_proto import coordinator_pb2 as cpb
from fl_sim.engine import Outcome
from fl_sim.settings import SimSettings
from fl_sim.worker import hospital_index

PLOT_HOSPITALS = 12


def describe(task: Any, data_dir: Path, settings: SimSettings) -> dict[str, Any]:
    """The demo's data description, for every virtual hospital (a hospital sharing a
    part with others, under --partitions, is described by its part)."""
    parts = [f"{HOSPITAL_PREFIX}{i}" for i in range(1, settings.parts + 1)]
    data = describe_data(task, data_dir, parts)
    if settings.parts < settings.hospitals:
        by_part = data["hospitals"]
        data["hospitals"] = {
            name: {**by_part[parts[(hospital_index(name) - 1) % settings.parts]],
                   "part": parts[(hospital_index(name) - 1) % settings.parts]}
            for name in settings.hospital_names}
    return data


def rows(outcome: Outcome) -> list[RoundRow]:
    """One row per round, its final attempt (as the server's rounds table has it)."""
    final = {a.round: a for a in outcome.attempts}
    return [RoundRow(round=r, state=a.state, selected=len(a.selected),
                     reported=len(a.accepted), seconds=a.seconds, metrics=dict(a.metrics),
                     epsilon=dict(outcome.epsilon_by_round.get(r, {})))
            for r, a in sorted(final.items())]


def build(settings: SimSettings, task: Any, config: cpb.TrainConfig, data: dict[str, Any],
          outcome: Outcome, simulation: dict[str, Any], started: float) -> dict[str, Any]:
    cfg = settings.server
    # The demo's job budget per hospital: None says "a fixed noise", inf "no DP".
    demo = DemoSettings(model_type=cfg.model_type, out=settings.out,
                        hospitals=settings.hospitals, rounds=cfg.rounds,
                        local_epochs=config.local_epochs,
                        noise_multiplier=config.privacy.noise_multiplier,
                        epsilon_budget=settings.epsilon_budget,
                        epsilon_per_hospital=(config.privacy.epsilon_per_job or None)
                        if config.privacy.enabled else math.inf,
                        alpha=settings.alpha, samples=settings.samples,
                        learning_rate=config.learning_rate, seed=cfg.seed,
                        strategy=cfg.strategy, baseline=False, fed_eval=False,
                        secure_aggregation=cfg.secure_aggregation)
    state = DemoState(demo, started=started, rows=rows(outcome), job_id=simulation["job_id"])
    report = build_report(demo, task, data, state, [])
    report["status"] = "ok" if outcome.completed else "failed"
    if not outcome.completed:
        report["error"] = outcome.reason
    report["settings"].update(
        privacy=privacy_text(config), dp=config.privacy.enabled, delta=config.privacy.delta,
        batch_size=config.batch_size,
        max_grad_norm=config.privacy.max_grad_norm,
        target_epsilon_per_round=config.privacy.target_epsilon,
        strategy_params=dict(cfg.strategy_params), fraction=cfg.fraction,
        min_clients=cfg.min_clients, quorum=cfg.quorum,
        max_round_attempts=cfg.max_round_attempts, partitions=settings.parts,
        dropout_rate=settings.dropout_rate)
    for key in ("processes", "exit_codes", "timeout_s", "extra_server_args"):
        report.pop(key, None)
        report["settings"].pop(key, None)
    report["simulation"] = {**simulation,
                            "attempts": [a.as_json() for a in outcome.attempts]}
    report["wall_seconds"] = round(time.monotonic() - started, 2)
    return report


def privacy_text(config: cpb.TrainConfig) -> str:
    """How the simulated hospitals trained, for the report's title and settings."""
    p = config.privacy
    if not p.enabled:
        return "no DP"
    if p.epsilon_per_job:
        return f"DP-SGD, epsilon <= {p.epsilon_per_job:g} per hospital (planned)"
    if p.target_epsilon:
        return f"DP-SGD, epsilon {p.target_epsilon:g} per round"
    return f"DP-SGD noise {p.noise_multiplier:g}"


def plot_view(report: dict[str, Any]) -> dict[str, Any]:
    """The report as the picture shows it: the first PLOT_HOSPITALS hospitals."""
    names = report["settings"]["hospital_names"]
    if len(names) <= PLOT_HOSPITALS:
        return report
    view = copy.deepcopy(report)
    keep = names[:PLOT_HOSPITALS]
    view["settings"]["hospital_names"] = keep
    view["data"]["hospitals"] = {k: view["data"]["hospitals"][k] for k in keep}
    return view


def draw(report: dict[str, Any], path: Path) -> None:
    """report.png, drawn by the demo's own plot."""
    plot(plot_view(report), path)
