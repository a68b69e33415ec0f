"""Screenshots of every page of the Streamlit app, in headless Chromium, for review and the docs.

    python tools/app_screenshots.py --model smollm2-135m --out reports/screenshots

Starts the app on a free port with the given model, opens each page, does the page's first
interaction (ablate heads in the playground, load the newest cached run on an analyzer page) and
saves a full-page PNG per page. Analyzer pages show results only if runs are cached for the model
(`make demo` or `probe scan` fills the cache of `$PROBE_HOME`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `tools` importable

from tools.browser import free_port, launch, start_app  # noqa: E402

ANALYZER_PAGES = ("retrieval", "duo", "successor", "safety", "factual", "cdt")


def wait_idle(page, timeout_s: float = 300.0) -> None:
    """Wait until Streamlit stops running the script (its status widget disappears)."""
    page.wait_for_timeout(1500)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if page.locator('[data-testid="stStatusWidget"]').count() == 0:
            page.wait_for_timeout(800)
            if page.locator('[data-testid="stStatusWidget"]').count() == 0:
                return
        page.wait_for_timeout(500)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="reports/screenshots")
    parser.add_argument("--heads", default="L23H3, L17H3", help="heads the playground ablates")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_app(args.model, port)
    url = f"http://127.0.0.1:{port}"
    timings: list[tuple[str, float]] = []
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def shoot(name: str, path: str, action=None) -> None:
                start = time.perf_counter()
                page.goto(f"{url}/{path}", timeout=120_000)
                wait_idle(page)
                if action is not None:
                    action()
                    wait_idle(page)
                # Streamlit scrolls inside its main block, so a "full page" shot would stop at the
                # viewport: grow the viewport to the content's height instead.
                height = page.evaluate("Math.max(...[...document.querySelectorAll('section, div')]"
                                       ".map(e => e.scrollHeight))")
                page.set_viewport_size({"width": 1400, "height": min(max(int(height) + 40, 1000), 12000)})
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                page.set_viewport_size({"width": 1400, "height": 1000})
                timings.append((name, time.perf_counter() - start))
                print(f"{name}: {timings[-1][1]:.1f} s", flush=True)

            def attention() -> None:
                box = page.get_by_label("Prompt").first
                box.fill(args.prompt)
                box.press("Enter")

            def playground() -> None:
                heads = page.get_by_label("Heads (e.g. L5H3, 2.1, L0H*)")
                heads.fill(args.heads)
                heads.press("Enter")

            shoot("model", "")
            shoot("attention", "attention", attention)
            shoot("playground", "playground", playground)
            shoot("atlas", "atlas")
            for name in ANALYZER_PAGES:
                def load() -> None:
                    button = page.get_by_role("button", name="Load", exact=True)
                    if button.count():
                        button.first.click()
                shoot(f"analysis_{name}", f"analysis_{name}", load)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("wrote", ", ".join(f"{out}/{name}.png" for name, _ in timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
