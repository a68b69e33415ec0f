"""Headless Chromium and a local Streamlit server, shared by the browser tests and the screenshot tools.

One place for the Chromium flags this machine needs (without the background-networking ones Chromium
keeps trying to reach Google and gets refused), for starting the app on a free port, and for the
"does this report open offline" check.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def launch(playwright: Any) -> Any:
    """Debian's Chromium, headless, through a running `sync_playwright()`."""
    if CHROMIUM is None:
        raise RuntimeError("Debian chromium is not installed (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(model: str, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """The Streamlit app on 127.0.0.1:`port` with `model` preloaded; returns once it answers its health check."""
    env = {**os.environ, "PROBE_APP_MODEL": model, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"streamlit did not answer on port {port} within {timeout_s:.0f} s")


@dataclass
class ReportCheck:
    """What Chromium made of a report opened from disk with the network refused."""

    n_figures: int  # plotly figures in the HTML
    drawn: int  # figures Chromium drew
    seconds: float
    outside: list[str] = field(default_factory=list)  # requests that tried to leave the file
    errors: list[str] = field(default_factory=list)  # page errors

    @property
    def ok(self) -> bool:
        return self.drawn == self.n_figures and not self.outside and not self.errors


def open_report_offline(page: Any, html: Path, timeout_ms: int = 120_000) -> ReportCheck:
    """Open `html` in `page` with every http(s) request refused; wait until every plotly figure is drawn."""
    html = html.resolve()
    n_figures = html.read_text().count("Plotly.newPlot")
    outside: list[str] = []
    errors: list[str] = []

    def refuse(route: Any) -> None:
        outside.append(route.request.url)
        route.abort()

    page.route("http*://**/*", refuse)
    page.on("pageerror", lambda error: errors.append(str(error)))
    started = time.perf_counter()
    page.goto(html.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}",
                           timeout=timeout_ms)
    drawn = page.locator(".js-plotly-plot").count()
    return ReportCheck(n_figures, drawn, time.perf_counter() - started, outside, errors)
