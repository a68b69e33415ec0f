"""Every tied number in docs/*.md equals its committed result file, read by key path.

How to tie a doc number (the convention; docs stay readable, an HTML comment renders as nothing):

1. Once per section, name the result file in a directive, and say it (and the command) in the prose:

       <!-- results: docs/results/successor_smollm2.json config=configs/successor_smollm2.yaml -->
       Command: `probe scan ... --out reports/x`; result: `docs/results/successor_smollm2.json`.

   The file must be committed under docs/results/ or bench/results/; the section (heading to heading)
   holding the directive must name the file and show a command (probe/python/pytest/make) in backticks
   or in a code block. `config=` (optional): a committed YAML whose analyzer settings must equal the
   ones the file records (`config` or `provenance.config`).
2. Right after the number, with no space, put a marker with the key path and a Python format spec:

       top head L23H3 scores 0.202<!--= result.top_heads.0.score .3f -->
       258<!--= result.n_scored.*|sum d --> scored tokens; 4.3e-5<!--= result.p.fisher .1e -->
       111/1726 = 0.064<!--= result.arithmetic.*.successes|sum / result.arithmetic.*.trials|sum .3f -->
       L23H3<!--= result.top_heads.0.head str --> (any value as text: `str`)

   Key path: dot-separated keys (in double quotes when they hold spaces or dots), list indices
   (negative too), `*` for every item and `a:b` for a slice (a list results). After a path, `|op`
   (no spaces; write `\\|op` in a table row, where a bare `|` splits the cells) applies len, sum, min,
   max, mean, median, sd (sample), pstd, flat, abs, first, last, means (each row's mean), count>X
   (items above X) or pctN (numpy's linear percentile); the last two flatten nested lists. Operands
   (paths or numbers) may be joined by + - * / ( ) with spaces around each. Format: a Python format
   spec (`.3f`, `,.0f`, `.0%`, `.1e`, `d`, `,d`) or `str`. `file#path` reads another committed file
   (`bench/results/x.json#rows.0.fast_s .1f`), which the doc must name.
3. The number compared is the one right before the marker (markdown `**`/backticks around it are fine;
   a unit such as `s`, `x`, `%`, `MiB` may stand between number and marker). Compared loosely only in
   form: `−` = `-`, `.60` = `0.60`, `1,963` = `1963`, `42 %` = `42%`, `4.3e-05` = `4.3e-5`.

A number with no committed result file says so in the doc ("not from a committed result file").
Rendered docs must not show marker text (checked with markdown-it when installed). Tables written by
tools/architectures_table.py are compared whole against docs/results/architectures_matrix.json.
Run time: reads JSON only (about 2 s with pytest's start-up on an idle 2-core machine).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULT_DIRS = ("docs/results/", "bench/results/")

DIRECTIVE = re.compile(r"<!--\s*results:\s*(?P<path>\S+)(?:\s+config=(?P<config>\S+))?\s*-->")
MARKER = re.compile(r"<!--=\s*(?P<spec>.*?)\s*-->", re.S)
# the number right before a marker: optional emphasis/backticks after it and an optional unit
NUMBER = re.compile(r"(?P<num>(?:(?<![\w.)])[−-])?(?:\d[\d,]*)?\.?\d+(?:[eE][−+-]?\d+)?)"
                    r"(?P<unit>\s?%|\s?(?:x|×|s|ms|min|MiB|GiB|KiB|B|nats|tokens))?[*`]*$")
WORD = re.compile(r"(?P<num>[^\s*`(|]+)[*`]*$")
OPS = {
    "len": len, "sum": sum, "min": min, "max": max, "mean": statistics.fmean, "sd": statistics.stdev,
    "pstd": statistics.pstdev, "median": statistics.median, "abs": abs, "first": lambda v: v[0],
    "last": lambda v: v[-1],
    "flat": lambda v: [x for row in v for x in row], "means": lambda v: [statistics.fmean(row) for row in v],
}


class DocNumberError(Exception):
    """A marker that cannot be read (bad path, op or format)."""


@functools.lru_cache(maxsize=None)
def load(path: str) -> Any:
    return json.loads((ROOT / path).read_text())


def at(document: Any, path: str) -> Any:
    """The value at a dot-separated key path; `*` maps the rest of the path over every item."""
    parts = [p.strip('"') for p in re.findall(r'"[^"]*"|[^.]+', path)] if path else []
    for i, part in enumerate(parts):
        if part == "*" or (":" in part and isinstance(document, list)):
            items = document if isinstance(document, list) else list(document.values())
            if part != "*":
                start, stop = (int(x) if x else None for x in part.split(":", 1))
                items = items[start:stop]
            rest = ".".join(parts[i + 1:])
            return [at(item, rest) for item in items]
        if isinstance(document, list):
            try:
                document = document[int(part)]
            except (ValueError, IndexError) as error:
                raise DocNumberError(f"bad list index {part!r} in {path!r}") from error
        elif isinstance(document, dict) and part in document:
            document = document[part]
        else:
            keys = list(document)[:12] if isinstance(document, dict) else type(document).__name__
            raise DocNumberError(f"no key {part!r} in {path!r} (has {keys})")
    return document


def operand(token: str, default_file: str | None) -> Any:
    """A number literal, or `[file#]path[|op...]` read from the result file."""
    try:
        return float(token)
    except ValueError:
        pass
    path, *ops = [t.strip() for t in token.replace("\\|", "|").split("|")]
    if "#" in path:
        file, path = path.split("#", 1)
    else:
        file = default_file
    if file is None:
        raise DocNumberError(f"{token!r}: no `<!-- results: ... -->` directive before it and no file#")
    value = at(load(file), path)
    for op in ops:
        quantile = re.fullmatch(r"pct(\d+(?:\.\d+)?)", op)
        if quantile:  # numpy's default (linear) percentile of the items, nested lists flattened
            value = _percentile(sorted(_leaves(value)), float(quantile.group(1)))
            continue
        above = re.fullmatch(r"count>(-?[\d.e-]+)", op)
        if above:  # how many items (nested lists flattened) exceed the number
            value = sum(1 for x in _leaves(value) if x > float(above.group(1)))
            continue
        if op not in OPS:
            raise DocNumberError(f"unknown op {op!r} (known: {', '.join(OPS)})")
        value = OPS[op](value)
    return value


def _percentile(items: list[float], q: float) -> float:
    position = (len(items) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(items) - 1)
    return items[low] + (items[high] - items[low]) * (position - low)


def _leaves(value: Any) -> list[Any]:
    return [x for item in value for x in _leaves(item)] if isinstance(value, list) else [value]


def evaluate(expression: str, default_file: str | None) -> Any:
    """Operands joined by + - * / (spaces around the operators), evaluated with Python's precedence."""
    tokens = re.findall(r'(?:"[^"]*"|\S)+', expression)  # a quoted key may hold spaces
    names: dict[str, Any] = {}
    source = []
    for token in tokens:
        token = token.strip()
        if token in ("+", "-", "*", "/", "(", ")"):
            source.append(token)
        else:
            name = f"v{len(names)}"
            names[name] = operand(token, default_file)
            source.append(name)
    if len(names) == 1:
        return names["v0"]
    return eval(" ".join(source), {"__builtins__": {}}, names)  # only v0..vn and + - * /


def render(value: Any, spec: str) -> str:
    if spec == "str":
        return str(value)
    if isinstance(value, str):  # a number stored as text ("2.00")
        try:
            value = float(value)
        except ValueError as error:
            raise DocNumberError(f"format {spec!r} for the text {value!r}") from error
    if isinstance(value, float) and spec.endswith("d"):
        if value != int(value):
            raise DocNumberError(f"format {spec!r} for a non-integer {value!r}")
        value = int(value)
    return format(value, spec)


def normal(text: str) -> str:
    """The written form, loosened only where two spellings mean the same number."""
    text = text.replace("−", "-").replace(",", "").replace(" ", "").replace("\u202f", "").replace("\u2009", "")
    text = re.sub(r"(?<![\d.])0\.(?=\d)", ".", text)
    text = re.sub(r"e([+-]?)0*(\d)", lambda m: f"e{'' if m.group(1) == '+' else m.group(1)}{m.group(2)}", text)
    return text


def split_spec(spec: str) -> tuple[str, str]:
    """(expression, format): the format is the last word."""
    expression, _, fmt = spec.rpartition(" ")
    if not expression:
        raise DocNumberError(f"marker {spec!r} lacks a format (e.g. `.3f`, `d`, `str`)")
    return expression, fmt


def markers(doc: Path) -> list[dict[str, Any]]:
    """Every marker of a doc with the written number before it and the directive in force."""
    text = doc.read_text()
    directives = [(m.start(), m["path"]) for m in DIRECTIVE.finditer(text)]
    found = []
    for match in MARKER.finditer(text):
        before = text[:match.start()]
        line = before.count("\n") + 1
        file = next((p for start, p in reversed(directives) if start < match.start()), None)
        expression, fmt = split_spec(match["spec"])
        tail = MARKER.sub("", before[-200:])  # a marker right after another one's number
        written = (WORD if fmt == "str" else NUMBER).search(tail)
        number = None
        if written:  # a percent sign belongs to the number when the format makes one
            number = written["num"] + ("%" if fmt.endswith("%") and "%" in (written.groupdict()["unit"] or "") else "")
        row = text[text.rfind("\n", 0, match.start()) + 1:match.start()]
        found.append({"doc": doc.name, "line": line, "spec": match["spec"], "file": file, "expression": expression,
                      "fmt": fmt, "written": number, "in_table": row.lstrip().startswith("|")})
    return found


ALL = [m for doc in DOCS for m in markers(doc)]


@functools.lru_cache(maxsize=None)
def _committed() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", *RESULT_DIRS, "configs/"], cwd=ROOT, capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a source tarball): files on disk
        return ({str(p.relative_to(ROOT)) for d in RESULT_DIRS for p in (ROOT / d).glob("*.json")}
                | {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")})
    return set(out.stdout.split())


@pytest.mark.parametrize("marker", ALL, ids=[f"{m['doc']}:{m['line']}" for m in ALL])
def test_doc_number_equals_its_result_file(marker):
    assert marker["written"] is not None, f"no number right before the marker <!--= {marker['spec']} -->"
    if marker["in_table"]:  # a bare | inside a comment still splits a markdown table's cells
        assert not re.search(r"(?<!\\)\|", marker["spec"]), f"in a table row write `\\|` for ops: {marker['spec']}"
    for named in re.findall(r"(\S+?)#", marker["expression"]):  # another file than the directive's
        assert named.startswith(RESULT_DIRS) and named in _committed(), f"{named}: not a committed result file"
        assert named in re.sub(r"<!--.*?-->", "", (ROOT / "docs" / marker["doc"]).read_text(), flags=re.S), (
            f"{marker['doc']} does not name {named} in its text")
    value = evaluate(marker["expression"], marker["file"])
    if isinstance(value, float) and math.isnan(value):
        pytest.fail(f"{marker['spec']} is NaN in the result file")
    expected = render(value, marker["fmt"])
    assert normal(marker["written"]) == normal(expected), (
        f"{marker['doc']}:{marker['line']} says {marker['written']!r}, the result file gives {expected!r} "
        f"({marker['spec']} = {value!r})")


def _sections(text: str) -> list[tuple[int, str]]:
    """(start offset, text) of each heading-to-heading section."""
    starts = [0] + [m.start() for m in re.finditer(r"^#{1,6} ", text, re.M)] + [len(text)]
    return [(a, text[a:b]) for a, b in zip(starts, starts[1:]) if b > a]


DIRECTIVES = [(doc, m.start(), m["path"]) for doc in DOCS for m in DIRECTIVE.finditer(doc.read_text())]
CONFIGS = [(doc, m["path"], m["config"]) for doc in DOCS for m in DIRECTIVE.finditer(doc.read_text()) if m["config"]]


@pytest.mark.parametrize("doc,path,config", CONFIGS, ids=[f"{d.name}:{c}" for d, _, c in CONFIGS])
def test_result_file_was_made_with_its_committed_config(doc, path, config):
    """`config=configs/x.yaml` in a directive: every setting of the YAML's analyzer section equals the one
    the result file records (its `config`, else `provenance.config`)."""
    import yaml

    assert config in _committed(), f"{config} is not committed"
    sections = yaml.safe_load((ROOT / config).read_text())
    document = load(path)
    assert isinstance(sections, dict) and sections, f"{config}: no analyzer section"
    # a YAML for a multi-analyzer scan (e.g. retrieval + duo) is compared on the section of the file's analyzer
    name = document.get("name") if len(sections) > 1 else next(iter(sections))
    assert name in sections, f"{config} has no section for {path}'s analyzer {name!r}"
    settings = json.loads(json.dumps(sections[name]))  # tuples/lists and numbers as JSON has them
    recorded = document.get("config") or document.get("provenance", {}).get("config")
    assert isinstance(recorded, dict), f"{path} records no config"
    differ = {k: (v, recorded.get(k, "<absent>")) for k, v in settings.items() if recorded.get(k, "<absent>") != v}
    assert not differ, f"{path} was not made with {config}: {differ}"


@pytest.mark.parametrize("doc,offset,path", DIRECTIVES, ids=[f"{d.name}:{p}" for d, _, p in DIRECTIVES])
def test_each_result_file_is_committed_and_named_with_its_command(doc, offset, path):
    assert path.startswith(RESULT_DIRS), f"{path}: result files live in {' or '.join(RESULT_DIRS)}"
    assert path in _committed(), f"{path} is not committed (git ls-files)"
    load(path)  # valid JSON
    section = next(s for start, s in _sections(doc.read_text()) if start <= offset < start + len(s))
    visible = re.sub(r"<!--.*?-->", "", section, flags=re.S)
    assert path in visible, f"{doc.name}: the section of <!-- results: {path} --> does not name the file in its text"
    command = r"\b(probe|python|pytest|make)\b"
    assert re.search(rf"`[^`\n]*{command}[^`\n]*`|^(    |\t)\s*\S*{command}|```[^`]*{command}", visible, re.M), (
        f"{doc.name}: the section of {path} shows no command (in backticks) that reproduces it")


def test_markers_read_and_fail_as_they_should(tmp_path):
    """The convention itself: paths, ops, arithmetic, formats, the loose comparison and a changed number."""
    data = {"a": {"b": [1.0, 2.0, 4.5]}, "rows": [{"s": 3, "t": 10}, {"s": 1, "t": 10}], "name": "L1H2"}
    assert at(data, "a.b.-1") == 4.5 and at({"x y.z": [1]}, '"x y.z".0') == 1 and at(data, "rows.*.s") == [3, 1]
    file = tmp_path / "r.json"
    file.write_text(json.dumps(data))
    load.cache_clear()
    rel = os.path.relpath(file, ROOT)
    assert evaluate(f"{rel}#rows.*.s|sum / {rel}#rows.*.t|sum", None) == 0.2
    assert evaluate(f"{rel}#a.b|mean * 100", None) == pytest.approx(250.0)
    assert evaluate(f"( {rel}#a.b.0 + {rel}#a.b.1 ) / 2", None) == 1.5 and at(data, "a.b.1:") == [2.0, 4.5]
    assert evaluate(f"{rel}#rows.0:2.s|sum", None) == 4 and evaluate(f"{rel}#a.b|count>1.5", None) == 2
    assert evaluate(f"{rel}#a.b|pct50", None) == 2.0 and evaluate(f"{rel}#a.b|pct75", None) == 3.25
    assert operand(f"{rel}#a.b|pstd", None) > 0 and evaluate(f"{rel}#a.b\\|max", None) == 4.5
    assert render(0.06428, ".3f") == "0.064" and render(42.0, "d") == "42" and render(0.42, ".0%") == "42%"
    assert normal("−0.60") == normal("-.60") and normal("1,963") == normal("1963") and normal("42 %") == "42%"
    assert normal("4.3e-05") == normal("4.3e-5") and normal("10.5") != normal("1.5")
    doc = tmp_path / "d.md"
    doc.write_text(f"<!-- results: {rel} -->\nmean **2.50**<!--= a.b|mean .2f --> and 20 %<!--= rows.0.s / "
                   f"rows.0.t .0% -->? no: 30 %<!--= rows.0.s / rows.0.t .0% -->, head L1H2<!--= name str -->, "
                   f"18.0x<!--= a.b.1 * 9 .1f -->\n")
    found = markers(doc)
    assert [m["written"] for m in found] == ["2.50", "20%", "30%", "L1H2", "18.0"]
    results = [normal(m["written"]) == normal(render(evaluate(m["expression"], m["file"]), m["fmt"])) for m in found]
    assert results == [True, False, True, True, True]
    with pytest.raises(DocNumberError, match="no key"):
        evaluate("a.c", rel)
    with pytest.raises(DocNumberError, match="unknown op"):
        evaluate("a.b|mode", rel)
    load.cache_clear()


# ---- docs/ARCHITECTURES.md's tables: the committed matrix JSON -------------------------------------------

MATRIX = "docs/results/architectures_matrix.json"


def test_architectures_tables_are_what_the_committed_matrix_gives():
    """tools/architectures_table.py run on the committed matrix leaves docs/ARCHITECTURES.md unchanged
    (regenerate both with the command in that doc)."""
    spec = importlib.util.spec_from_file_location("architectures_table", ROOT / "tools" / "architectures_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # type: ignore[union-attr]
    assert MATRIX in _committed(), f"{MATRIX} is not committed"
    text = (ROOT / "docs" / "ARCHITECTURES.md").read_text()
    assert tool.render(text, load(MATRIX)) == text
    assert MATRIX in text


@pytest.mark.parametrize("doc", [d for d in DOCS if "<!--=" in d.read_text()], ids=lambda d: d.name)
def test_markers_stay_invisible_when_the_doc_renders(doc):
    """Rendered as GFM tables + CommonMark, no marker text leaks into the page (a bare `|` in a table row's
    comment would split the cell and show the comment's pieces)."""
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(doc.read_text())
    visible = re.sub(r"<!--.*?-->", "", html, flags=re.S)
    assert "&lt;!--" not in visible and "--&gt;" not in visible
