"""Reports from a scan document (`results.json`): self-contained HTML, Markdown, and score comparisons.

Everything is rebuilt from the JSON alone (no model needed), deterministically: the same
`results.json` gives byte-identical HTML.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from analyses.registry import ANALYZERS
from probe.errors import ProbeError
from probe.files import one_line, write_text_atomic
from probe.results import HeadScores


def load_document(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.exists():
        raise ProbeError(f"{path} does not exist: run `probe scan --out {folder}` first.")
    try:
        document = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ProbeError(f"{path} is corrupt ({one_line(error)}): rerun `probe scan --out {folder}` to rebuild it "
                         f"from the finished analyses in {Path(folder) / 'results'}.") from error
    if not isinstance(document, dict) or not isinstance(document.get("analyses"), dict):
        raise ProbeError(f"{path} is not a scan document: rerun `probe scan --out {folder}` to rebuild it.")
    return document


def head_scores(document: dict[str, Any]) -> dict[str, HeadScores]:
    return {name: HeadScores.from_json(rec["scores"]) for name, rec in document["analyses"].items()}


def analysis_figures(name: str, record: dict[str, Any]) -> dict[str, go.Figure]:
    """The analyzer's own figures, from its serialised result."""
    entry = ANALYZERS[name]
    result = entry.result_type().from_json(record["result"])
    return entry.load().figures(result)


def atlas_figure(scores: dict[str, HeadScores]) -> go.Figure:
    """One layer x head heatmap per analysis, each scaled to [0, 1] so they read side by side."""
    names = sorted(scores)
    figure = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        values = scores[name].scores.double()
        finite = values[torch.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        scaled = (values - lo) / (hi - lo) if hi > lo else torch.zeros_like(values)
        figure.add_trace(go.Heatmap(z=scaled.numpy(), colorscale="Viridis", zmin=0, zmax=1, showscale=col == 1,
                                    hovertemplate=f"{name} L%{{y}}H%{{x}}: %{{z:.2f}}<extra></extra>"), row=1, col=col)
    figure.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    figure.update_layout(title="Head atlas (each analysis min-max scaled)", height=520)
    return figure


def _fig_html(figure: go.Figure, div_id: str) -> str:
    return pio.to_html(figure, full_html=False, include_plotlyjs=False, div_id=div_id)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def build_html(document: dict[str, Any]) -> str:
    model = document["model"]
    records = document["analyses"]
    parts = [f"<h1>probe scan: {html.escape(model['spec'])}</h1>",
             "<h2>Model</h2>", _table([[k, v] for k, v in model.items()], ["fact", "value"]),
             "<h2>Summary: top heads</h2>",
             _table([[name, rec["units"], ", ".join(f"{h} ({s:.3g})" for h, s in rec["top_heads"][:5]),
                      f"{rec['seconds']:.1f}\u00a0s"] for name, rec in sorted(records.items())],
                    ["analysis", "units", "top 5 heads", "time"])]
    if document.get("errors"):
        parts += ["<h2>Failed analyses</h2>", _table([[k, v] for k, v in document["errors"].items()], ["analysis", "error"])]
    if records:
        parts += ["<h2>Head atlas</h2>", _fig_html(atlas_figure(head_scores(document)), "fig-atlas")]
    for name, rec in sorted(records.items()):
        parts += [f"<h2>{html.escape(name)}</h2>", f"<pre>{html.escape(rec['summary'])}</pre>"]
        for index, (title, figure) in enumerate(analysis_figures(name, rec).items()):
            parts += [f"<h3>{html.escape(title)}</h3>", _fig_html(figure, f"fig-{name}-{index}")]
        parts += ["<details><summary>settings</summary><pre>"
                  + html.escape(json.dumps(rec["config"], indent=1, sort_keys=True)) + "</pre></details>"]
    parts += ["<h2>Reproduce</h2>", f"<pre>{html.escape(document.get('command', ''))}</pre>"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>probe scan</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def build_markdown(document: dict[str, Any]) -> str:
    model = document["model"]
    lines = [f"# probe scan: {model['spec']}", "", "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in model.items()]
    lines += ["", "## Top heads", "", "| analysis | units | top 5 heads | time |", "|---|---|---|---|"]
    for name, rec in sorted(document["analyses"].items()):
        top = ", ".join(f"{h} ({s:.3g})" for h, s in rec["top_heads"][:5])
        lines.append(f"| {name} | {rec['units']} | {top} | {rec['seconds']:.1f} s |")
    for name, error in document.get("errors", {}).items():
        lines.append(f"\n**{name} failed:** {error}")
    for name, rec in sorted(document["analyses"].items()):
        lines += ["", f"## {name}", "", "```", rec["summary"], "```"]
    lines += ["", "## Reproduce", "", "```", document.get("command", ""), "```", ""]
    return "\n".join(lines)


def write_reports(folder: Path, document: dict[str, Any] | None = None) -> tuple[Path, Path]:
    folder = Path(folder)
    document = document or load_document(folder)
    html_path, md_path = folder / "report.html", folder / "report.md"
    write_text_atomic(html_path, build_html(document))  # a killed write never leaves half a report
    write_text_atomic(md_path, build_markdown(document))
    return html_path, md_path


def compare_documents(a: dict[str, Any], b: dict[str, Any], top: int = 10) -> str:
    """How head scores differ between two scans, for every analysis they share."""
    sa, sb = head_scores(a), head_scores(b)
    shared = sorted(set(sa) & set(sb))
    if not shared:
        raise ProbeError("The two scans share no analysis.")
    lines = [f"A: {a['model']['spec']} ({a['model']['fingerprint']})   B: {b['model']['spec']} ({b['model']['fingerprint']})"]
    for name in shared:
        x, y = sa[name].scores.double(), sb[name].scores.double()
        lines.append(f"\n== {name} ({sa[name].units})")
        top_a = ", ".join(f"{h} {s:.3g}" for h, s in sa[name].top(5))
        top_b = ", ".join(f"{h} {s:.3g}" for h, s in sb[name].top(5))
        lines += [f"top A: {top_a}", f"top B: {top_b}"]
        if x.shape != y.shape:
            lines.append(f"shapes differ ({tuple(x.shape)} vs {tuple(y.shape)}): only the top heads compare")
            continue
        mask = torch.isfinite(x) & torch.isfinite(y)
        xs, ys = x[mask], y[mask]
        corr = float(torch.corrcoef(torch.stack([xs, ys]))[0, 1]) if xs.numel() > 1 and xs.std() > 0 and ys.std() > 0 else float("nan")
        lines.append(f"Pearson correlation of all head scores: {corr:.3f}")
        diff = torch.nan_to_num(y - x)
        order = torch.argsort(diff.abs().flatten(), descending=True)[:top]
        n_heads = x.shape[1]
        lines.append("largest changes (B - A): " + ", ".join(
            f"L{int(i) // n_heads}H{int(i) % n_heads} {float(diff.flatten()[i]):+.3g}" for i in order))
    return "\n".join(lines)
