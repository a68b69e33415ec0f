"""docs/BENCHMARKS.md is exactly what `python bench/summarize.py` writes from the committed bench/results/*.json.

The page is generated, so its numbers are tied to their result files by regenerating it in memory
(`summarize.render()`, which writes nothing) and comparing the whole text. After a bench
re-run: `python bench/summarize.py` and commit both. Reads JSON only (well under a second).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "BENCHMARKS.md"


def _summarize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "bench" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _first_difference(page: str, rendered: str) -> str:
    diff = difflib.unified_diff(page.splitlines(), rendered.splitlines(), "docs/BENCHMARKS.md (committed)",
                                "bench/summarize.py render()", n=0, lineterm="")
    return "\n".join(list(diff)[:12])


def test_the_page_is_what_summarize_renders_from_the_result_files():
    rendered = _summarize().render()
    page = PAGE.read_text()
    assert page == rendered, ("docs/BENCHMARKS.md differs from its result files; regenerate it with "
                              "`python bench/summarize.py`:\n" + _first_difference(page, rendered))


def test_every_result_file_the_page_reads_is_committed():
    """An uncommitted bench/results/*.json would make the page render from a file nobody else has."""
    try:
        listed = subprocess.run(["git", "ls-files", "bench/results/"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a source tarball): nothing to compare
        return
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").glob("*.json")}
    assert on_disk <= set(listed), f"not committed: {sorted(on_disk - set(listed))}"


def test_a_changed_result_value_changes_the_page(tmp_path):
    """The comparison can fail: one number changed in a copy of the result files shows on the page."""
    summarize = _summarize()
    copy = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", copy)
    assert summarize.render(copy) == summarize.render()
    fused = copy / "fused.json"
    data = json.loads(fused.read_text())
    data["rows"][-1]["bridge_s"] += 1.0
    fused.write_text(json.dumps(data))
    assert summarize.render(copy) != PAGE.read_text()
    assert not (tmp_path / "BENCHMARKS.md").exists() and PAGE.read_text() == summarize.render()  # render writes nothing
