"""What a finished safety run shows: the plain-text summary and the figures."""

from __future__ import annotations

from typing import Any

import torch

from analyses.safety.result import SafetyResult


def summary(result: SafetyResult) -> str:
    """Plain text for the CLI and reports: top Ships heads, the Sahara trace, ASR by group size."""
    lines = ["top Ships heads: " + ", ".join(f"{h} {s:.3f}" for h, s in result.ships.top(5)),
             "Sahara: " + " -> ".join(f"{step.head} ({step.score:.2f} deg)" for step in result.sahara_steps)]
    valid = result.summary
    if valid:
        lines.append(f"base ASR {valid['base_asr']:.2f}, harmless refusal {valid['base_harmless_refusal']}")
        for row in valid["by_size"]:
            line = (f"  {row['size']} heads: ASR {row['asr']:.2f} (delta {row['delta_asr']:+.2f}); random "
                    f"{row['random_asr_mean']:.2f} +- {row['random_asr_std']:.2f}; beats random: {row['beats_random']}")
            if "fisher_p" in row:
                needed = row["prompts_needed"]
                line += (f"; {row['found_complied']}/{row['n_prompts']} vs {row['random_complied']}/{row['random_n']}: "
                         f"Fisher p {row['fisher_p']:.3g}, permutation p {row['permutation_p']:.3g}; prompts for "
                         f"p<0.05 at this effect: {needed['at_observed']} (80% power: {needed['for_power']})")
            if "harmless_perplexity" in row:
                line += (f"; harmless perplexity {row['harmless_perplexity']:.2f} (random "
                         f"{row.get('random_harmless_perplexity_mean', float('nan')):.2f})")
            lines.append(line)
        if "verdicts_changed_by_short_rule" in valid:
            lines.append(f"verdicts the paper's fixed 32-token short rule would change: "
                         f"{valid['verdicts_changed_by_short_rule']} of {valid['verdicts_judged']}")
    if result.query_level:
        q = result.query_level
        lines.append(f"query level (own top head per query, {q['n']} queries): ASR {q['base_asr']:.2f} -> {q['asr']:.2f}; "
                     f"one random head per query {q['random_asr']:.2f}; Fisher p {q['fisher_p']:.3g}, "
                     f"permutation p {q['permutation_p']:.3g}")
    return "\n".join(lines)


def figures(result: SafetyResult) -> dict[str, Any]:
    """Ships heat map, generalized-Ships map, Sahara trace, ASR vs group size, example generations."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    for key, scores in (("ships_heatmap", result.ships), ("generalized_heatmap", result.generalized)):
        grid = scores.scores.to(torch.float64)
        figs[key] = go.Figure(go.Heatmap(z=grid.tolist(), x=[f"H{h}" for h in range(scores.n_heads)],
                                         y=[f"L{layer}" for layer in range(scores.n_layers)],
                                         colorscale="Viridis", colorbar={"title": scores.units}))
        figs[key].update_layout(title=f"{scores.name} per head ({scores.units})", yaxis={"autorange": "reversed"},
                                xaxis_title="query head", yaxis_title="layer")
    figs["sahara_trace"] = go.Figure(go.Scatter(
        x=list(range(1, len(result.sahara_steps) + 1)), y=[s.score for s in result.sahara_steps],
        text=[str(s.head) for s in result.sahara_steps], mode="lines+markers+text", textposition="top center"))
    figs["sahara_trace"].update_layout(title="Sahara: dataset-level score of the growing group",
                                       xaxis_title="group size", yaxis_title="angle (degrees)", xaxis_dtick=1)
    if result.summary:
        rows = result.summary["by_size"]
        sizes = [r["size"] for r in rows]
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=sizes, y=[r["asr"] for r in rows], mode="lines+markers", name="Sahara group"))
        fig.add_trace(go.Scatter(x=sizes, y=[r["random_asr_mean"] for r in rows], mode="lines+markers",
                                 name="random groups (mean ± std)",
                                 error_y={"type": "data", "array": [r["random_asr_std"] for r in rows]}))
        fig.add_hline(y=result.summary["base_asr"], line_dash="dot", annotation_text="no ablation")
        fig.update_layout(title="Held-out ASR vs number of ablated heads", xaxis_title="heads ablated",
                          yaxis_title="ASR", yaxis_range=[0, 1.05], xaxis_dtick=1)
        figs["asr_vs_size"] = fig
    if result.examples:
        base = result.examples.get("base", [])
        after_key = next((k for k in result.examples if k != "base"), None)
        after = result.examples.get(after_key, []) if after_key else []
        figs["examples"] = go.Figure(go.Table(
            header={"values": ["prompt", "before", f"after ({after_key})"]},
            cells={"values": [[e["prompt"][:120] for e in base],
                              [f"[{'refused' if e['refused'] else 'complied'}] {e['output'][:200]}" for e in base],
                              [f"[{'refused' if e['refused'] else 'complied'}] {e['output'][:200]}" for e in after]]}))
        figs["examples"].update_layout(title="Example generations before / after ablation")
    return figs
