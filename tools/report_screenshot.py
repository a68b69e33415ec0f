"""Open a scan report in headless Chromium with the network refused, check every figure drew, save PNGs.

    python tools/report_screenshot.py reports/demo/scan --out reports/demo/screenshots

Writes `report_top.png` (the first screen a reader sees) and `report_full.png` (the whole page), and
prints how many figures the HTML holds, how many Chromium drew, and any request that tried to leave
the file or any page error (both must be empty for a report that opens offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `tools` importable

from tools.browser import launch, open_report_offline  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", type=Path, help="scan folder holding report.html")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: the scan folder)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    html = args.scan / "report.html"
    if not html.exists():
        raise SystemExit(f"{html} does not exist: run `probe scan` or `probe report {args.scan}` first")
    out = args.out or args.scan
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        check = open_report_offline(page, html)
        page.screenshot(path=str(out / "report_top.png"))
        page.screenshot(path=str(out / "report_full.png"), full_page=True)
        browser.close()
    print(f"{html.resolve()}: {check.drawn}/{check.n_figures} figures drawn in {check.seconds:.1f} s; "
          f"requests outside the file: {check.outside}; page errors: {check.errors}")
    print(f"wrote {out / 'report_top.png'}, {out / 'report_full.png'}")
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
