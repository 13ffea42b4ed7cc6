"""The operator's dashboard in a real browser (Playwright driving Debian's chromium)
during a real two-hospital federation: round 2 completed, each hospital's epsilon
series, no console errors; a screenshot is saved. Also: the page's server refuses a
foreign Host header and paths outside its static folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_demo.launcher import REPO_ROOT
from tests.observability.conftest import HOSPITALS, LiveFederation

# generous: the shared federation starts in the first of these tests to run, and a loaded
# machine (other suites, torch imports) can take minutes before round 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def dashboard(live: LiveFederation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m fl_server.admin dashboard` against the live federation; yields its URL."""
    fed = live.fed
    ready = tmp_path_factory.mktemp("dashboard") / "ready.json"
    log = open(fed.log_dir / "dashboard.log", "ab")  # noqa: SIM115 - closed below
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_server.admin", "dashboard", "--server_url",
         f"127.0.0.1:{fed.port}", "--keys_dir", str(fed.workdir / "keys"), "--port", "0",
         "--refresh_s", "0.5", "--ready_file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("dashboard did not start:\n" + fed.tail("dashboard.log"))
            time.sleep(0.1)
        yield str(json.loads(ready.read_text())["url"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_dashboard_shows_the_federation_live(dashboard: str, live: LiveFederation,
                                             tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed: {INSTALL}")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install -e '.[dev]' (playwright)")
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(dashboard)
            # polled from here: wait_for_function evaluates a string, which the page's
            # Content-Security-Policy (no unsafe-eval) rightly refuses
            deadline = time.monotonic() + 480
            while int(page.inner_text("#rounds-completed") or 0) < 2:
                if time.monotonic() > deadline:
                    pytest.fail("the page never showed round 2 completed:\n"
                                + live.fed.tail("server.log"))
                time.sleep(0.5)
            page.wait_for_selector('#rounds tr[data-round="2"][data-state="completed"]')
            assert page.inner_text("#link") == "live"
            assert page.inner_text("#job-id").startswith("job-")
            # every hospital: a row, connected, with its epsilon against its budget
            for name in HOSPITALS:
                row = page.locator(f'#hospitals tr[data-hospital="{name}"]')
                assert row.count() == 1
                cells = row.locator("td").all_inner_texts()
                # connected until the job ends (then the daemons exit)
                assert cells[1] == "yes" or page.inner_text("#job-state") == "completed", cells
                assert cells[7].endswith("/ 50.00"), cells
            # the epsilon chart holds one series per hospital, rising round by round
            series = page.evaluate("""() => window.dashboard.charts.epsilon.data.datasets
                                       .map(d => ({label: d.label, data: d.data}))""")
            assert sorted(s["label"] for s in series) == sorted(HOSPITALS)
            for s in series:
                points = [p for p in s["data"] if p is not None]
                assert len(points) >= 2 and 0 < points[0] < points[1], s
            loss = page.evaluate("() => window.dashboard.charts.loss.data.datasets"
                                 ".map(d => d.label)")
            assert "train_loss" in loss
            events = page.locator("#events li").all_inner_texts()
            assert any("round_completed" in e for e in events), events
            assert any("join" in e for e in events), events
            shot = Path(os.environ.get("FL_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert not problems, problems


def test_dashboard_refuses_foreign_host_and_paths(dashboard: str) -> None:
    request = urllib.request.Request(dashboard, headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 421
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(dashboard + "..%2f..%2fdashboard.py", timeout=10)
    assert missing.value.code == 404
    with urllib.request.urlopen(dashboard + "vendor/chart.js/LICENSE.md", timeout=10) as reply:
        assert b"MIT" in reply.read() or reply.status == 200
    with urllib.request.urlopen(dashboard, timeout=10) as reply:
        assert "script-src 'self'" in reply.headers["Content-Security-Policy"]


def test_dashboard_bad_keys_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fl_server.admin", "dashboard", "--keys_dir",
                           str(tmp_path), "--port", "0"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "ca.crt is missing" in done.stderr and "--issue-admin" in done.stderr
    assert shutil.which(sys.executable)
