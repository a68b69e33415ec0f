"""Plotly figures for CD-T results: circuit graph, relevance heatmap, faithfulness curves, token relevance."""

from __future__ import annotations

import plotly.graph_objects as go

from analyses.cdt.circuits import Circuit


def circuit_graph(circuit: Circuit, n_layers: int, n_heads: int, min_share: float = 0.1) -> go.Figure:
    """Heads placed by (head, layer), logits on top; edges with |score| ≥ min_share × the largest into a target."""
    positions = {str(h): (h.head, h.layer) for h in circuit.heads}
    positions["logits"] = ((n_heads - 1) / 2, n_layers)
    strongest: dict[str, float] = {}
    for _, target, score in circuit.edges:
        strongest[target] = max(strongest.get(target, 0.0), abs(score))
    fig = go.Figure()
    for source, target, score in circuit.edges:
        if source in positions and target in positions and abs(score) >= min_share * strongest[target] > 0:
            (x0, y0), (x1, y1) = positions[source], positions[target]
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text",
                                     text=f"{source} → {target}: {score:.3g}", showlegend=False,
                                     line={"width": 1 + 4 * abs(score) / strongest[target],
                                           "color": "#1f77b4" if score >= 0 else "#d62728"}))
    names = list(positions)
    fig.add_trace(go.Scatter(x=[positions[n][0] for n in names], y=[positions[n][1] for n in names],
                             mode="markers+text", text=names, textposition="top center", showlegend=False,
                             marker={"size": 14, "color": ["#444" if n == "logits" else "#ff7f0e" for n in names]}))
    fig.update_layout(title=f"{circuit.method} circuit ({len(circuit.heads)} heads)", xaxis_title="head",
                      yaxis_title="layer")
    return fig


def relevance_heatmap(values, title: str) -> go.Figure:
    """`[L, H]` relevance as a heatmap (layers on y)."""
    fig = go.Figure(go.Heatmap(z=[[float(v) for v in row] for row in values], colorscale="RdBu", zmid=0))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
    return fig


def faithfulness_curves(sizes: list[int], curves: dict[str, list]) -> go.Figure:
    """Faithfulness vs circuit size for each method; random circuits as a mean line and points."""
    fig = go.Figure()
    for name, values in curves.items():
        if name == "random_all":
            for size, draws in zip(sizes, values):
                fig.add_trace(go.Scatter(x=[size] * len(draws), y=draws, mode="markers", showlegend=False,
                                         marker={"color": "gray", "size": 5, "opacity": 0.5}))
            continue
        fig.add_trace(go.Scatter(x=sizes, y=values, mode="lines+markers", name=name))
    fig.update_layout(title="faithfulness vs circuit size", xaxis_title="heads kept",
                      yaxis_title="(m(C) − m(∅)) / (m(M) − m(∅))", xaxis_tickvals=sorted(set(sizes)))
    return fig


def token_relevance_figure(words: list[str], cdt: list[float], occlusion: list[float]) -> go.Figure:
    fig = go.Figure([go.Bar(x=words, y=cdt, name="CD-T β of logit diff"),
                     go.Bar(x=words, y=occlusion, name="leave-one-out occlusion")])
    fig.update_layout(barmode="group", title="which words drive the logit difference", yaxis_title="logit diff")
    return fig
