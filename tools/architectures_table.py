"""Write docs/ARCHITECTURES.md's matrix tables from a proof-matrix run, so they cannot drift from the code.

    PROBE_MATRIX_OUT=docs/results/architectures_matrix.json pytest tests/families/test_architectures_*.py [tests/families/test_*_families.py ...]
    python tools/architectures_table.py docs/results/architectures_matrix.json           # rewrite the tables in place
    python tools/architectures_table.py docs/results/architectures_matrix.json --check   # exit 1 if the docs differ

The matrix the committed tables come from is committed as docs/results/architectures_matrix.json (the full
command is in docs/ARCHITECTURES.md); tests/docs/test_doc_numbers.py checks that `render` on it leaves the doc unchanged.

The JSON is tests/support/matrix.py's (`checks`, `cells`, `bounds`, `facts`). Four tables are replaced, each between
`<!-- matrix:NAME:begin -->` and `<!-- matrix:NAME:end -->` (the prose around them stays):

- `facts`: family × component, from the architecture layer's facts (`Architecture.summary()`);
- `analyzers`: family × analyzer, how many checks each has and whether all are within bounds;
- `deviations`: check × family, the largest deviation measured, with each check's tolerance;
- `effects`: check × family, the smallest effect measured (a switched-off component, an intervention
  that must move the output), with each check's minimum.

Whatever checks the JSON holds are included (other family test files add theirs); a cell held to
another bound than its row's shows it in brackets, a cell outside its bound is marked ✗. `parse_tables` reads the two number tables back (tests/families/test_architectures_components.py checks
the committed docs cell by cell against the bounds).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md"

# family key (tests/support/families.py) -> label, in the docs' order; unknown families follow, sorted
LABELS = {
    "llama": "Llama", "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE", "gemma2": "Gemma 2", "gemma3": "Gemma 3", "phi3": "Phi-3", "olmo2": "OLMo-2",
    "gpt_neox": "GPT-NeoX", "gpt2": "GPT-2",
}
# checks in reading order (the run's own first); unknown checks follow, sorted
ORDER = (
    "logits", "left-pad", "zero-head", "intervention: zero", "intervention: mean", "intervention: resample",
    "intervention: uniform", "intervention: scale query", "intervention: scale value",
    "intervention: scale value (KV group)", "intervention: scale output", "mlp/embed", "successor e(t)",
    "successor OV", "retrieval argmax≠", "attn rows", "safety Ships", "factual DLA", "duo streaming vs mask",
    "duo gates vs blend",
    "off: attn soft-cap", "off: final soft-cap", "off: QK-norm", "off: post norms", "off: 1+w offset",
    "off: embed scale", "off: sliding window", "off: partial rotary", "off: parallel block", "off: biases",
    "off: MoE top-k",
    "moves: zero", "moves: mean", "moves: resample", "moves: uniform", "moves: scale query", "moves: scale value",
    "moves: scale output", "moves: duo streaming", "moves: duo gates",
)
# family × analyzer: which checks belong to which column (first matching prefix wins)
ANALYZERS = (
    ("bridge = HF", ("logits", "left-pad", "zero-head", "intervention: ", "mlp/embed", "forward from layer",
                     "plain final states", "fused ")),
    ("components visible", ("off: ", "moves: ")),
    ("retrieval", ("retrieval", "attn rows")),
    ("successor", ("successor",)),
    ("safety", ("safety",)),
    ("factual", ("factual",)),
    ("cdt", ("cdt",)),
    ("duo", ("duo",)),
    ("planted", ("plant",)),
)
FACT_COLUMNS = ("family", "block", "norm", "placement", "QK-norm", "Gemma offset", "rotary dims / d_head", "MLP",
                "packed qkv", "KV heads", "embed scale", "soft-caps (attn / final)", "windows")


def families_of(matrix: dict[str, Any]) -> list[str]:
    found = set(matrix.get("cells", {})) | set(matrix.get("facts", {}))
    return [f for f in LABELS if f in found] + sorted(found - set(LABELS))


def checks_of(matrix: dict[str, Any], kind: str) -> list[str]:
    checks = [c for c, spec in matrix.get("checks", {}).items() if spec["kind"] == kind]
    known = [c for c in ORDER if c in checks]
    return known + sorted(set(checks) - set(known))


def _number(value: float) -> str:
    if value is None:
        return "–"
    if math.isnan(value):
        return "nan"
    return "0" if value == 0 else f"{value:.1e}"


def _fact_row(family: str, facts: dict[str, Any]) -> list[str]:
    def num(x: Any) -> str:
        return "–" if x is None else f"{float(x):g}"

    mlp = facts["mlp"]
    if mlp == "moe" and facts.get("experts"):
        mlp = f"MoE ({facts['experts']} experts, top {facts['top_k']})"
    if facts.get("rotary_dims") is not None:
        rotary = f"{facts['rotary_dims']}/{facts['d_head']}"
    else:
        rotary = "learned positions" if facts.get("learned_positions") else "none"
    windows = facts.get("windows") or []
    return [
        LABELS.get(family, family), facts["block"], facts["norm"], facts["placement"], facts["qk_norm"] or "–",
        num(facts["gemma_offset"]), rotary, mlp, "yes" if facts["qkv_fused"] else "no", str(facts["n_kv_heads"]),
        num(facts["embed_scale"]),
        "–" if not (facts.get("softcap_attn") or facts.get("softcap_logits"))
        else f"{num(facts.get('softcap_attn'))} / {num(facts.get('softcap_logits'))}",
        ", ".join("–" if w is None else str(w) for w in windows) if any(w is not None for w in windows) else "–",
    ]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def facts_table(facts: dict[str, dict[str, Any]]) -> str:
    """Family × component, from each family's recorded facts."""
    order = families_of({"facts": facts})
    return _markdown(list(FACT_COLUMNS), [_fact_row(f, facts[f]) for f in order])


def _bound_of(matrix: dict[str, Any], family: str, check: str) -> float:
    return float(matrix.get("bounds", {}).get(family, {}).get(check, matrix["checks"][check]["bound"]))


def _row_bound(matrix: dict[str, Any], families: list[str], check: str, kind: str) -> float:
    """The bound most of the row's families are held to (ties: the strictest)."""
    bounds = [_bound_of(matrix, f, check) for f in families if check in matrix["cells"].get(f, {})]
    if not bounds:
        return float(matrix["checks"][check]["bound"])
    return sorted(set(bounds), key=lambda b: (-bounds.count(b), b if kind == "deviation" else -b))[0]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def number_table(matrix: dict[str, Any], kind: str) -> str:
    """Check × family for `kind` ("deviation": largest, bound a tolerance; "effect": smallest, bound a
    minimum). A cell held to another bound than its row's shows it in brackets; one outside it, ✗."""
    families = [f for f in families_of(matrix) if f in matrix.get("cells", {})]
    sign = "≤" if kind == "deviation" else "≥"
    rows = []
    for check in checks_of(matrix, kind):
        row_bound = _row_bound(matrix, families, check, kind)
        cells = []
        for family in families:
            value = matrix["cells"].get(family, {}).get(check)
            text = _number(value)
            if value is not None:
                bound = _bound_of(matrix, family, check)
                if bound != row_bound:
                    text += f" ({sign} {_number(bound)})"
                if not (value <= bound if kind == "deviation" else value >= bound):
                    text += " ✗"
            cells.append(text)
        rows.append([_escape(check), f"{sign} {_number(row_bound)}", *cells])
    return _markdown(["check", "bound", *[LABELS.get(f, f) for f in families]], rows)


def analyzer_of(check: str) -> str:
    for column, prefixes in ANALYZERS:
        if check.startswith(prefixes):
            return column
    return "other"


def _within(matrix: dict[str, Any], family: str, check: str) -> bool:
    value = matrix["cells"][family][check]
    bound = _bound_of(matrix, family, check)
    return value <= bound if matrix["checks"][check]["kind"] == "deviation" else value >= bound


def analyzer_table(matrix: dict[str, Any]) -> str:
    """Family × analyzer: how many of the column's checks the family has, and whether all are within
    their bounds (✓ n) or not (✗ failing/n)."""
    families = [f for f in families_of(matrix) if f in matrix.get("cells", {})]
    columns = [c for c, _ in ANALYZERS] + ["other"]
    used = [c for c in columns if any(analyzer_of(k) == c for k in matrix["checks"])]
    rows = []
    for family in families:
        row = [LABELS.get(family, family)]
        for column in used:
            checks = [k for k in matrix["cells"][family] if analyzer_of(k) == column and k in matrix["checks"]]
            bad = [k for k in checks if not _within(matrix, family, k)]
            row.append("–" if not checks else f"✓ {len(checks)}" if not bad else f"✗ {len(bad)}/{len(checks)}")
        rows.append(row)
    return _markdown(["family", *used], rows)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- matrix:{name}:begin -->", f"<!-- matrix:{name}:end -->"


def section(text: str, name: str) -> str:
    """The text between a table's markers (stripped)."""
    begin, end = _markers(name)
    if begin not in text or end not in text:
        raise ValueError(f"docs lack the markers {begin} ... {end}")
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def replace_section(text: str, name: str, table: str) -> str:
    begin, end = _markers(name)
    section(text, name)  # raises when the markers are missing
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def render(text: str, matrix: dict[str, Any]) -> str:
    """`text` with the three tables replaced by what `matrix` gives."""
    text = replace_section(text, "facts", facts_table(matrix.get("facts", {})))
    text = replace_section(text, "analyzers", analyzer_table(matrix))
    text = replace_section(text, "deviations", number_table(matrix, "deviation"))
    return replace_section(text, "effects", number_table(matrix, "effect"))


_CELL = re.compile(r"(?P<value>\S+)(?: \((?P<sign>[≤≥]) (?P<bound>\S+)\))?(?P<bad> ✗)?")


def _split_row(line: str) -> list[str]:
    """A markdown table row's cells, `\\|` unescaped."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def parse_tables(text: str) -> dict[str, Any]:
    """The docs' deviation and effect tables read back: `{"checks": {check: {"kind", "bound"}},
    "cells": {family label: {check: value}}, "bounds": {family label: {check: bound}}}` (labels as
    turned back into family keys; a cell's bound is its row's unless the cell names its own)."""
    keys = {label: family for family, label in LABELS.items()}
    out: dict[str, Any] = {"checks": {}, "cells": {}, "bounds": {}}
    for name, kind in (("deviations", "deviation"), ("effects", "effect")):
        lines = [line for line in section(text, name).splitlines() if line.startswith("|")]
        header = _split_row(lines[0])
        for line in lines[2:]:
            cells = _split_row(line)
            check, bound = cells[0], cells[1]
            match = re.fullmatch(r"[≤≥] (\S+)", bound)
            if match is None or len(cells) != len(header):
                raise ValueError(f"{name}: cannot read the row of {check!r}")
            out["checks"][check] = {"kind": kind, "bound": float(match.group(1))}
            for label, cell in zip(header[2:], cells[2:]):
                family = keys.get(label, label)
                if cell in ("–", "-", ""):
                    continue
                found = _CELL.fullmatch(cell)
                if found is None:
                    raise ValueError(f"{name}: cannot read {family} / {check}: {cell!r}")
                out["cells"].setdefault(family, {})[check] = float(found["value"])
                out["bounds"].setdefault(family, {})[check] = float(found["bound"] or match.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", type=Path, help="the JSON a run wrote to $PROBE_MATRIX_OUT")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the docs differ")
    args = parser.parse_args(argv)
    matrix = json.loads(args.matrix.read_text())
    old = args.docs.read_text()
    new = render(old, matrix)
    if args.check:
        if new != old:
            print(f"{args.docs} differs from what {args.matrix} gives", file=sys.stderr)
            return 1
        return 0
    args.docs.write_text(new)
    print(f"wrote {args.docs} ({len(families_of(matrix))} families, {len(matrix.get('checks', {}))} checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
