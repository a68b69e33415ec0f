"""Write docs/BENCHMARKS.md from bench/results/*.json (each bench script writes one JSON file).

Every scalar at the top level of a result file becomes a row of a "measure | value" table; a list of
row objects (`rows`) becomes a table of its own, one line per measured case (e.g. per context length).
Files without a bench script of the same name are experiment records and are listed as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# Benchmarks

Each script in `bench/` runs a fast path against its naive reference on the same inputs, once, and
writes `bench/results/<name>.json`; `python bench/summarize.py` rebuilds this page from those files.
Timings are wall-clock seconds on the machine named in each table (thread count included); the
development machine is a 2-core CPU that was often shared with other jobs while these ran, so
compare ratios within one table rather than absolute times across tables.
"""


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
        return ", ".join(shown(v) for v in value)
    return str(value)


def row_table(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table for a list of row objects (columns: the union of their scalar keys, in order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(shown(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    script = ROOT / "bench" / f"bench_{path.stem}.py"
    title = f"`bench/{script.name}`" if script.exists() else "experiment record, not a bench script"
    parts = [f"\n## {path.stem} ({title})\n", "| measure | value |", "|---|---|"]
    for key, value in data.items():
        if isinstance(value, (int, float, str, bool)) or value is None or (
                isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value)):
            parts.append(f"| {key} | {shown(value)} |")
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        parts += ["", *row_table(rows)]
    return parts


def main() -> None:
    parts = [INTRO]
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        parts += section(path)
    (ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")
    print("wrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
