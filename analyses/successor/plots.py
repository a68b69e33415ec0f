"""How a successor result is shown: plotly figures and the plain-text summary."""

from __future__ import annotations

import plotly.graph_objects as go

from analyses.successor.config import SuccessorResult


def figures(result: SuccessorResult) -> dict[str, go.Figure]:
    """Heatmap of scores, per-task bars of the top heads, probe accuracy, arithmetic table, ablation."""
    figs: dict[str, go.Figure] = {}
    s = result.scores.scores
    figs["scores"] = go.Figure(go.Heatmap(z=s.tolist(), x=[f"H{h}" for h in range(s.shape[1])],
                                          y=[f"L{l}" for l in range(s.shape[0])], colorscale="Viridis",
                                          zmin=0, zmax=1, colorbar={"title": "score"}))
    figs["scores"].update_layout(title=f"Successor score per head (chance {result.chance:.3f}, "
                                       f"threshold {result.threshold})", xaxis_title="head", yaxis_title="layer")
    bars = go.Figure()
    for entry in result.top_heads[:5]:
        bars.add_bar(name=entry["head"], x=result.task_names, y=[entry["per_task"][n] for n in result.task_names])
    bars.add_scatter(name="chance", x=result.task_names, y=[result.task_chance[n] for n in result.task_names],
                     mode="markers", marker={"symbol": "line-ew-open", "size": 30, "color": "black"})
    bars.update_layout(title="Per-task successor score of the top heads", barmode="group", yaxis_range=[0, 1.05],
                       yaxis_title="score")
    figs["per_task"] = bars
    if result.probe:
        tasks = list(result.probe)
        probe = go.Figure()
        probe.add_bar(name="held-out accuracy", x=tasks, y=[result.probe[t]["accuracy"] for t in tasks])
        probe.add_bar(name="majority baseline", x=tasks, y=[result.probe[t]["majority"] for t in tasks])
        probe.add_hline(y=0.1, line_dash="dash", annotation_text="chance 0.1")
        probe.update_layout(title="Index mod 10 probe on effective embeddings (task held out)",
                            yaxis_range=[0, 1.05], barmode="group")
        figs["probe"] = probe
    if result.arithmetic:
        rows = result.arithmetic
        figs["arithmetic"] = go.Figure(go.Table(
            header={"values": ["task", "trials", "successes", "rate", "chance"]},
            cells={"values": [[r["task"] for r in rows], [r["trials"] for r in rows], [r["successes"] for r in rows],
                              [f"{r['rate']:.3f}" for r in rows], [f"{r['chance']:.3f}" for r in rows]]}))
        figs["arithmetic"].update_layout(title=f"Vector arithmetic through {result.arithmetic_head}")
    causal = result.causal
    if causal and "effect" in causal:
        ablation = go.Figure()
        ablation.add_box(y=causal["random_effects"], name="random heads", boxpoints="all", jitter=0.3)
        ablation.add_scatter(x=["top heads"], y=[causal["effect"]], mode="markers", name=", ".join(causal["heads"]),
                             marker={"size": 14, "color": "crimson"})
        ablation.update_layout(title="Drop in P(correct next item) under mean ablation", yaxis_title="mean ΔP")
        figs["ablation"] = ablation
    return figs


def summary(result: SuccessorResult) -> str:
    """A plain-text summary (for the CLI and reports)."""
    lines = [f"chance {result.chance:.3f}; successor heads (> {result.threshold}): "
             f"{', '.join(result.successor_heads) or 'none'}"]
    for entry in result.top_heads:
        tasks = " ".join(f"{n}={v:.2f}" for n, v in entry["per_task"].items())
        lines.append(f"  {entry['head']:8s} {entry['score']:.3f}  {tasks}")
    return "\n".join(lines)
