"""Write docs/BENCHMARKS.md from bench/results/*.json (each bench script writes one JSON file).

Every scalar at the top level of a result file becomes a row; lists and nested objects stay in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# Benchmarks

Each script in `bench/` runs a fast path against its naive reference on the same inputs, once, and
writes `bench/results/<name>.json`; `python bench/summarize.py` rebuilds this page from those files.
Timings are wall-clock seconds on the machine named in each table (thread count included); the
development machine is a 2-core CPU that was often shared with other jobs while these ran, so
compare ratios within one table rather than absolute times across tables.
"""


def main() -> None:
    parts = [INTRO]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        rows = [(k, v) for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None]
        parts.append(f"\n## {path.stem} (`bench/bench_{path.stem}.py`)\n\n| measure | value |\n|---|---|")
        for key, value in rows:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"| {key} | {shown} |")
    (ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")
    print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
