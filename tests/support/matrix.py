"""The architecture proof matrix's shared record: one cell per (family, check), one loaded model per family.

Every family test file (tests/families/test_architectures_*.py, tests/families/test_cdt_families.py, ...) records its
numbers here, so that docs/ARCHITECTURES.md's tables come from one run (tools/architectures_table.py):

- `record(family, check, value)` — a deviation (smaller is better): the cell keeps the largest value
  seen, and `tolerance` (default 1e-4) is the bound the docs test holds the cell to;
- `record_effect(family, check, value)` — an effect that must be large (a switched-off component, an
  intervention that must move the output): the cell keeps the smallest value seen, `minimum` its bound;
- `record_facts(family, facts)` — the architecture layer's facts (`Architecture.summary()`);
- `loaded_family(name, root)` — `(LoadedModel via load_model("hf:<folder>"), an independent HF copy,
  folder)`, built once per process whatever test file asks first. Shared by every file: a test that
  changes weights or leaves hooks must restore them (or load its own copy from the folder).

Where the cells go: when the environment variable `PROBE_MATRIX_OUT` names a file, the cells are
written there as JSON when the test process exits (merged into what the file already holds: a cell
this run measured replaces the file's). Without it nothing is written. To rebuild the docs tables:

    PROBE_MATRIX_OUT=docs/results/architectures_matrix.json pytest tests/families/test_architectures_*.py [other family files]
    python tools/architectures_table.py docs/results/architectures_matrix.json   # rewrites docs/ARCHITECTURES.md's tables

(the committed docs/results/architectures_matrix.json is the run the committed tables come from; remove it
first for a fresh run, since cells merge into what the file holds).

JSON layout: `{"version": 1, "checks": {check: {"kind": "deviation" | "effect", "bound": float}},
"cells": {family: {check: value}}, "bounds": {family: {check: bound}}, "facts": {family: {...}}}`
(a check may hold families to different bounds, e.g. a looser one for MoE: `bounds` is per cell).
tests/conftest.py puts tests/support on `sys.path`, so test files `import matrix`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from families import build_folder, load_hf_copy

ENV = "PROBE_MATRIX_OUT"
DEFAULT_TOLERANCE = 1e-4
DEFAULT_MINIMUM = 1e-2
VERSION = 1

CELLS: dict[str, dict[str, float]] = {}
BOUNDS: dict[str, dict[str, float]] = {}  # per cell: a check may hold families to different bounds
CHECKS: dict[str, dict[str, Any]] = {}
FACTS: dict[str, dict[str, Any]] = {}
_LOADED: dict[str, tuple[Any, torch.nn.Module, Path]] = {}


def _declare(family: str, check: str, kind: str, bound: float) -> None:
    known = CHECKS.get(check)
    if known is not None and known["kind"] != kind:
        raise ValueError(f"matrix check {check!r} recorded both as a {known['kind']} and as a {kind}")
    CHECKS[check] = {"kind": kind, "bound": float(bound)}
    BOUNDS.setdefault(family, {})[check] = float(bound)


def record(family: str, check: str, value: float, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Record a deviation; the cell keeps the largest value. Returns `value` (for `assert record(...) <= tol`)."""
    value = float(value)
    _declare(family, check, "deviation", tolerance)
    row = CELLS.setdefault(family, {})
    row[check] = max(row.get(check, 0.0), value) if not math.isnan(value) else value
    return value


def record_effect(family: str, check: str, value: float, minimum: float = DEFAULT_MINIMUM) -> float:
    """Record an effect that must be large; the cell keeps the smallest value. Returns `value`."""
    value = float(value)
    _declare(family, check, "effect", minimum)
    row = CELLS.setdefault(family, {})
    row[check] = min(row[check], value) if check in row else value
    return value


def record_facts(family: str, facts: dict[str, Any]) -> None:
    """The architecture layer's facts of a family (JSON-able values), for the family × component table."""
    FACTS[family] = json.loads(json.dumps(facts))


def loaded_family(name: str, root: Path) -> tuple[Any, torch.nn.Module, Path]:
    """(model loaded the user's way, `load_model("hf:<folder>")`; an independent HF copy; folder), once per
    process: the first caller's `root` holds the folder."""
    from probe.models import load_model

    if name not in _LOADED:
        folder = build_folder(name, root)
        _LOADED[name] = (load_model(f"hf:{folder}", device="cpu"), load_hf_copy(folder), folder)
    return _LOADED[name]


def snapshot() -> dict[str, Any]:
    """This process's matrix as the JSON document (without merging any file)."""
    return {"version": VERSION, "checks": dict(CHECKS), "cells": {f: dict(r) for f, r in CELLS.items()},
            "bounds": {f: dict(r) for f, r in BOUNDS.items()}, "facts": dict(FACTS)}


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with every check, cell and fact of `new` replacing its own."""
    out = {"version": VERSION, "checks": {**old.get("checks", {}), **new["checks"]},
           "facts": {**old.get("facts", {}), **new["facts"]}}
    for part in ("cells", "bounds"):
        out[part] = {f: dict(r) for f, r in old.get(part, {}).items()}
        for family, row in new.get(part, {}).items():
            out[part].setdefault(family, {}).update(row)
    return out


def write(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Write (merge) the cells into `path` or `$PROBE_MATRIX_OUT`; nothing when neither is set or no cell."""
    target = path or os.environ.get(ENV)
    if not target or not (CELLS or FACTS):
        return None
    target = Path(target)
    old: dict[str, Any] = {}
    if target.is_file():
        try:
            old = json.loads(target.read_text())
        except json.JSONDecodeError:
            old = {}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merge(old, snapshot()), indent=1, sort_keys=True) + "\n")
    return target


def format_cells(families: list[str] | None = None) -> str:
    """A plain-text table of this process's cells (printed by test files with `-s`)."""
    checks = sorted(CHECKS)
    families = families or sorted(CELLS)
    lines = ["family      " + " ".join(f"{c[:14]:>14s}" for c in checks)]
    for family in families:
        cells = [CELLS.get(family, {}).get(c) for c in checks]
        lines.append(f"{family:11s} " + " ".join(f"{'-' if v is None else f'{v:.1e}':>14s}" for v in cells))
    return "\n".join(lines)


atexit.register(write)
