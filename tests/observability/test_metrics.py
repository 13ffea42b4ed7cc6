"""Prometheus metrics of both daemons, scraped over HTTP during a real two-hospital
federation: they change as rounds complete, and promtool accepts the exposition."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.conftest import HOSPITALS, LiveFederation, scrape, wait_for

# generous: the shared federation starts in the first of these tests to run, and a loaded
# machine (other suites, torch imports) can take minutes before round 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMTOOL_INSTALL = "apt-get update && apt-get install -y prometheus  (provides promtool)"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, metric: str, **labels: str) -> float | None:
    return samples(text).get((metric, tuple(sorted(labels.items()))))


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed: {PROMTOOL_INSTALL}")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_change_as_rounds_complete(live: LiveFederation) -> None:
    fed = live.fed

    def completed(text: str) -> float:
        return value(text, "fl_server_rounds_total", outcome="completed") or 0.0

    def scraped(predicate) -> str | None:  # type: ignore[no-untyped-def]
        """The first of the scrapes (taken every 0.5 s since the start) that matches."""
        return next((text for text in list(live.scrapes) if predicate(text)), None)

    # before: the last scrape of round 1 not yet completed (clients take seconds to start
    # and train); after: the first one with two rounds completed (later rounds can take
    # under a second, so no test here may wait for an exact count)
    second = wait_for(lambda: scraped(lambda t: completed(t) >= 2), 480,
                      "round 2 in the server's metrics", fed)
    before = [t for t in list(live.scrapes)[:live.scrapes.index(second)] if completed(t) == 0]
    assert before, "no scrape was taken before round 1 completed"
    first = before[-1]
    counts = [completed(t) for t in list(live.scrapes)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] >= 2

    assert completed(first) == 0 and completed(second) >= 2
    assert (value(first, "fl_server_model_round") or 0) < 2 <= value(second,  # type: ignore[operator]
                                                                      "fl_server_model_round")
    assert value(second, "fl_server_received_bytes_total") > \
        (value(first, "fl_server_received_bytes_total") or 0)  # type: ignore[operator]
    assert value(second, "fl_server_sent_bytes_total") > \
        (value(first, "fl_server_sent_bytes_total") or 0)  # type: ignore[operator]
    # both hospitals were seen connected (by "second" the job may have ended and the
    # hospitals left: rounds of the small model take a fraction of a scrape interval)
    assert max(value(t, "fl_server_clients_connected") or 0 for t in list(live.scrapes)) == 2
    for hospital in HOSPITALS:
        assert value(second, "fl_server_updates_accepted_total", client=hospital) >= 2
        assert value(second, "fl_server_client_last_seen_timestamp_seconds",
                     client=hospital) > 0  # type: ignore[operator]
        assert value(second, "fl_server_certificate_expiry_timestamp_seconds", kind="client",
                     name=hospital) > 0  # type: ignore[operator]
    assert value(second, "fl_server_certificate_expiry_timestamp_seconds", kind="ca",
                 name="ca") > 0  # type: ignore[operator]
    assert value(second, "fl_server_round_phase_seconds_count", phase="train") >= 2  # type: ignore[operator]

    def trained_twice() -> bool:
        return all((value(live.client_scrapes.get(n, ""), "fl_client_tasks_total", kind="TRAIN",
                          outcome="ok") or 0) >= 2 for n in HOSPITALS)

    wait_for(trained_twice, 120, "two training tasks in each hospital's metrics", fed)
    client = dict(live.client_scrapes)
    for name, text in client.items():
        spent = value(text, "fl_client_epsilon_spent")
        assert spent is not None and spent > 0, name
        assert value(text, "fl_client_epsilon_budget") == 50
        assert abs(value(text, "fl_client_epsilon_budget_remaining") - (50 - spent)) < 1e-6  # type: ignore[operator]
        assert value(text, "fl_client_sent_bytes_total") > 0  # type: ignore[operator]
        for kind in ("client", "ca"):
            expiry = value(text, "fl_client_certificate_expiry_timestamp_seconds", kind=kind)
            assert expiry is not None and expiry > time.time() + 86400, (name, kind)
        assert value(text, "fl_client_tasks_total", kind="TRAIN", outcome="ok") >= 2  # type: ignore[operator]
        assert sum(value(text, "fl_client_phase", phase=p) or 0 for p in
                   ("idle", "download", "train", "upload", "evaluate")) == 1

    promtool_check(second)
    promtool_check(scrape(live.server_metrics))  # now, whatever the job's state
    for text in client.values():
        promtool_check(text)


def test_metrics_bind_loopback_only(live: LiveFederation) -> None:
    import socket

    lan = [a for a in {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None,
                                                             socket.AF_INET)}
           if not a.startswith("127.")]
    if not lan:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{lan[0]}:{live.server_metrics}/metrics", timeout=3)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_deploy_files_name_only_exported_metrics(live: LiveFederation) -> None:
    """The Grafana dashboard and the alert rules query only metrics the daemons export,
    and promtool accepts the scrape config and the rules."""
    fed = live.fed
    wait_for(lambda: live.scrapes and len(live.client_scrapes) == len(HOSPITALS), 240,
             "a scrape of every daemon", fed)
    exported = set()
    for text in [live.scrapes[-1], *live.client_scrapes.values()]:
        for family in text_string_to_metric_families(text):  # declared, with or without samples
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
    texts = [(DEPLOY / "grafana" / "fl-federation.json").read_text(),
             (DEPLOY / "prometheus" / "alerts.yml").read_text()]
    json.loads(texts[0])
    used = {m for text in texts for m in re.findall(r"\bfl_(?:server|client)_[a-z_]+", text)}
    assert used and not used - exported, sorted(used - exported)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed: {PROMTOOL_INSTALL}")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
