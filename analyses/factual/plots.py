"""How a factual result is shown: plotly figures and the plain-text summary."""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.factual.config import FactualResult
from analyses.factual.rates import Rates
from analyses.stats import wilson_interval


def figures(result: FactualResult) -> dict[str, go.Figure]:
    """Attribution heatmap, top-head bars, rate-vs-scale curves (held-out, cluster-bootstrap intervals)."""
    scores = result.scores.scores.to(torch.float64)
    limit = float(scores.abs().max()) or 1.0
    heat = go.Figure(go.Heatmap(z=scores.tolist(), zmid=0.0, zmin=-limit, zmax=limit, colorscale="RdBu",
                                colorbar={"title": "DLA"},
                                hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>"))
    heat.update_layout(title="Direct attribution to logit(in-context) - logit(memorised) "
                             "(blue: in-context heads, red: memory heads)",
                       xaxis_title="head", yaxis_title="layer")

    bars_rows = list(reversed(result.top_memory)) + list(result.top_in_context)
    bars = go.Figure(go.Bar(x=[s for _, s in bars_rows], y=[h for h, _ in bars_rows], orientation="h",
                            marker_color=["#b2182b" if s < 0 else "#2166ac" for _, s in bars_rows]))
    bars.update_layout(title="Top memory (red) and in-context (blue) heads", xaxis_title="mean DLA",
                       yaxis={"type": "category"})

    curves = make_subplots(rows=1, cols=max(1, len(result.curves)),
                           subplot_titles=[f"scale {h}" for h in result.curves])
    for col, (head, curve) in enumerate(result.curves.items(), start=1):
        factors = curve["factors"]
        if curve.get("generation"):
            for label, colour in (("in_context", "#2166ac"), ("memorised", "#b2182b"), ("other", "#888888")):
                rates = [Rates.from_json(r) for r in curve["generation"]]
                values = [r.rate(label) for r in rates]
                low = [v - r.interval(label)[0] for v, r in zip(values, rates)]
                high = [r.interval(label)[1] - v for v, r in zip(values, rates)]
                curves.add_trace(go.Scatter(x=factors, y=values, mode="lines+markers", name=f"{label} ({head})",
                                            line={"color": colour},
                                            error_y={"type": "data", "symmetric": False, "array": high,
                                                     "arrayminus": low}), row=1, col=col)
        fast = [f["prefers_in_context"] for f in curve["fast"]]
        bounds = [f["intervals"]["prefers_in_context"] if f.get("intervals", {}).get("prefers_in_context")
                  else wilson_interval(round(v * f["n"]), f["n"]) for v, f in zip(fast, curve["fast"])]
        curves.add_trace(go.Scatter(x=factors, y=fast, mode="lines+markers",
                                    name=f"first token prefers in-context ({head})",
                                    line={"color": "#4393c3", "dash": "dot"},
                                    error_y={"type": "data", "symmetric": False,
                                             "array": [b[1] - v for v, b in zip(fast, bounds)],
                                             "arrayminus": [v - b[0] for v, b in zip(fast, bounds)]}),
                         row=1, col=col)
        curves.update_xaxes(title_text="scale factor", row=1, col=col)
    curves.update_yaxes(title_text="rate (held-out)", range=[0, 1])
    curves.update_layout(title="Held-out rates vs the scale of the chosen heads "
                               "(95% intervals, cluster bootstrap over countries)")
    return {"attribution": heat, "top_heads": bars, "scaling": curves}


def summary(result: FactualResult) -> str:
    """A few lines for the CLI and reports."""
    base = Rates.from_json(result.baseline["generation"])
    lines = [f"template {result.data['tuning']['template']}; known capitals {result.known['n_known']}/"
             f"{result.known['n_countries']}; held-out n={base.n}",
             f"baseline: in-context {base.rate('in_context'):.2f}, memorised {base.rate('memorised'):.2f}, "
             f"other {base.rate('other'):.2f}",
             "top in-context heads: " + ", ".join(f"{h} ({s:+.2f})" for h, s in result.top_in_context),
             "top memory heads: " + ", ".join(f"{h} ({s:+.2f})" for h, s in result.top_memory)]
    for direction, choice in result.best.items():
        rates = Rates.from_json(choice["heldout_generation"])
        lines.append(f"best towards {direction}: {choice['head']} x{choice['factor']:g} -> in-context "
                     f"{rates.rate('in_context'):.2f}, memorised {rates.rate('memorised'):.2f}")
    return "\n".join(lines)
