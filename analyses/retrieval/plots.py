"""The figures of a retrieval result: score heatmap, top heads, NIAH recall grids, accuracy vs k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyses.retrieval.result import MaskingResult, RetrievalResult


def figures(result: RetrievalResult) -> dict[str, Any]:
    """Heatmap of scores, ranked bar of the top heads, NIAH accuracy grids, accuracy-vs-k curves."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    scores = result.scores.scores
    figs["heatmap"] = go.Figure(go.Heatmap(
        z=scores.tolist(), x=[f"H{h}" for h in range(scores.shape[1])], y=[f"L{l}" for l in range(scores.shape[0])],
        colorscale="Viridis", colorbar={"title": "score"}))
    figs["heatmap"].update_layout(
        title=f"Retrieval score ({result.config['score_mode']}), {result.retained}/{result.attempted} samples retained",
        xaxis_title="query head", yaxis_title="layer", yaxis_autorange="reversed")

    top = result.scores.top(min(20, scores.numel()))
    figs["top_heads"] = go.Figure(go.Bar(x=[str(h) for h, _ in top], y=[s for _, s in top],
                                         marker_color=["crimson" if s > result.threshold else "grey" for _, s in top]))
    figs["top_heads"].add_hline(y=result.threshold, line_dash="dash", annotation_text=f"threshold {result.threshold:g}")
    figs["top_heads"].update_layout(title="Top heads by retrieval score", xaxis_title="head", yaxis_title="score")

    figs["niah_grid"] = _grid_figure(result.samples, [s["rouge1_recall"] for s in result.samples],
                                     "NIAH ROUGE-1 recall (no masking)")
    masking = result.masking
    if masking:
        kinds = sorted({c["kind"] for c in masking.conditions if c["selection"] != "none"})
        k_max = max(c["k"] for c in masking.conditions)
        for kind in kinds:
            for selection in ("top", "random"):
                picked = masking.find(kind, selection, k_max)
                if not picked:
                    continue
                per_prompt = [sum(masking.recall[i][j] for i in picked) / len(picked)
                              for j in range(len(masking.prompts))]
                figs[f"niah_grid_{kind}_{selection}{k_max}"] = _grid_figure(
                    masking.prompts, per_prompt,
                    f"NIAH ROUGE-1 recall, {selection} {k_max} heads masked ({kind})"
                    + (f", mean of {len(picked)} draws" if selection == "random" else ""))
        figs["accuracy_vs_k"] = _curve_figure(masking)
    return figs


def _grid_figure(prompts: Sequence[dict[str, Any]], values: Sequence[float], title: str) -> Any:
    import plotly.graph_objects as go

    lengths = sorted({p["context_length"] for p in prompts})
    depths = sorted({p["depth"] for p in prompts})
    z = []
    for depth in depths:
        row = []
        for length in lengths:
            cell = [v for p, v in zip(prompts, values) if p["context_length"] == length and p["depth"] == depth]
            row.append(100 * sum(cell) / len(cell) if cell else None)
        z.append(row)
    fig = go.Figure(go.Heatmap(z=z, x=[str(n) for n in lengths], y=[f"{d:g}%" for d in depths],
                               zmin=0, zmax=100, colorscale="RdYlGn", colorbar={"title": "recall %"},
                               texttemplate="%{z:.0f}%"))
    # category axes: plotly would otherwise read "512" / "50%" as numbers and stretch the cells
    fig.update_layout(title=title, xaxis_title="context length (tokens)", yaxis_title="needle depth",
                      xaxis_type="category", yaxis_type="category")
    return fig


def _curve_figure(masking: MaskingResult) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    kinds = sorted({c["kind"] for c in masking.conditions if c["selection"] != "none"})
    base = masking.accuracy(masking.find("", "none", 0)[0])
    for kind, dash in zip(kinds, ("solid", "dot")):
        rows = [r for r in masking.table() if r["kind"] == kind]
        ks = [0] + [r["k"] for r in rows]
        fig.add_trace(go.Scatter(x=ks, y=[100 * base] + [100 * r["top"] for r in rows], mode="lines+markers",
                                 name=f"top-k ({kind})", line={"color": "crimson", "dash": dash}))
        fig.add_trace(go.Scatter(x=ks, y=[100 * base] + [100 * r["random_mean"] for r in rows], mode="lines",
                                 name=f"random-k mean ({kind})", line={"color": "steelblue", "dash": dash}))
        fig.add_trace(go.Scatter(x=[r["k"] for r in rows for _ in r["random"]],
                                 y=[100 * a for r in rows for a in r["random"]], mode="markers",
                                 name=f"random-k draws ({kind})", marker={"color": "steelblue", "opacity": 0.5}))
    fig.update_layout(title="NIAH accuracy vs number of masked heads", xaxis_title="k heads masked",
                      yaxis_title="mean ROUGE-1 recall (%)", yaxis_range=[0, 105])
    return fig

