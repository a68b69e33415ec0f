"""Open a scan report in headless Chromium with the network refused, check every figure drew, save PNGs.

    python tools/report_screenshot.py reports/demo/scan --out reports/demo/screenshots

Writes `report_top.png` (the first screen a reader sees) and `report_full.png` (the whole page), and
prints how many figures the HTML holds, how many Chromium drew, and any request that tried to leave
the file or any page error (both must be empty for a report that opens offline).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", type=Path, help="scan folder holding report.html")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: the scan folder)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Debian chromium is not installed (apt-get install chromium)")
    html = (args.scan / "report.html").resolve()
    if not html.exists():
        raise SystemExit(f"{html} does not exist: run `probe scan` or `probe report {args.scan}` first")
    out = args.out or args.scan
    out.mkdir(parents=True, exist_ok=True)
    n_figures = html.read_text().count("Plotly.newPlot")
    outside: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        def refuse(route) -> None:  # noqa: ANN001 (playwright's Route)
            outside.append(route.request.url)
            route.abort()

        page.route("http*://**/*", refuse)
        page.on("pageerror", lambda error: errors.append(str(error)))
        started = time.perf_counter()
        page.goto(html.as_uri())
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}",
                               timeout=120_000)
        drawn = page.locator(".js-plotly-plot").count()
        seconds = time.perf_counter() - started
        page.screenshot(path=str(out / "report_top.png"))
        page.screenshot(path=str(out / "report_full.png"), full_page=True)
        browser.close()
    print(f"{html}: {drawn}/{n_figures} figures drawn in {seconds:.1f} s; requests outside the file: {outside}; "
          f"page errors: {errors}")
    print(f"wrote {out / 'report_top.png'}, {out / 'report_full.png'}")
    return 0 if drawn == n_figures and not outside and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
