"""End to end in a real headless Chromium: start the app, ablate a head, see the probabilities change."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_scan import fakes  # noqa: F401  (fixture: two stand-in analyzers)

from analyses.report import build_html, load_document, write_reports
from analyses.scan import ScanSettings, run_scan
from tools.browser import CHROMIUM, free_port, launch, open_report_offline, start_app

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def app_url():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("Debian chromium is not installed here (apt-get install chromium)")
    port = free_port()
    server = start_app("tiny-gqa", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_ablating_a_head_changes_the_shown_probabilities(app_url):
    playwright = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(f"{app_url}/playground", timeout=60_000)
        page.get_by_text("Intervention playground").first.wait_for(timeout=90_000)
        target = page.get_by_label("Target token to track (optional)")
        target.fill("mary")
        target.press("Enter")
        page.get_by_text("Applied: nothing").wait_for(timeout=60_000)
        heads = page.get_by_label("Heads (e.g. L5H3, 2.1, L0H*)")
        heads.fill("L1H0, L1H1, L1H2")
        heads.press("Enter")
        page.get_by_text("Applied: zero-ablate L1H0, L1H1, L1H2").wait_for(timeout=60_000)
        time.sleep(1.0)
        metric = page.locator('[data-testid="stMetric"]').filter(has_text="total variation")
        value = float(metric.locator('[data-testid="stMetricValue"]').inner_text())
        delta = page.locator('[data-testid="stMetric"]').filter(has_text="p(").locator(
            '[data-testid="stMetricDelta"]').inner_text()
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        browser.close()
    assert value > 0
    assert float(delta.split()[-1].replace("+", "")) != 0.0


def test_scan_report_opens_offline_with_every_figure_drawn(fakes, tiny_gqa, tmp_path):
    """The report of a scan renders in Chromium with every request outside the file refused."""
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed here (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "scan"
    document = run_scan(tiny_gqa, fakes, ScanSettings(analyses=["fake_a", "fake_b"], command="probe scan x"), out)
    html_path, _ = write_reports(out, document)
    n_figures = build_html(load_document(out)).count("Plotly.newPlot")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        check = open_report_offline(page, html_path, timeout_ms=30_000)
        page.screenshot(path=str(ARTIFACTS / "scan_report.png"), full_page=True)
        browser.close()
    assert check.n_figures == n_figures  # the file on disk holds what a rebuild from results.json holds
    assert n_figures >= 3 and check.drawn == n_figures
    assert check.outside == [] and check.errors == []
