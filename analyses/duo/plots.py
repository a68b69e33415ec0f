"""How a Duo result is shown: plotly figures and the plain-text summary."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from analyses.duo.config import DuoResult


def figures(result: DuoResult) -> dict[str, go.Figure]:
    gates = torch.as_tensor(result.gates)
    heat = go.Figure(go.Heatmap(z=gates.numpy(), colorscale="RdBu", zmin=0, zmax=1, colorbar={"title": "α"},
                                x=[f"KV{g}" for g in range(gates.shape[1])], y=[f"L{l}" for l in range(gates.shape[0])]))
    heat.update_layout(title="Learned gates (1 = retrieval / full attention, 0 = streaming)",
                       yaxis={"autorange": "reversed"}, height=520)
    # the total loss is dominated by λ·mean|α| and falls; the distillation term starts at 0 (all gates 1)
    # and rises as gates close: two linear axes show both shapes
    curves = go.Figure([go.Scatter(y=result.losses, name="loss (distillation + λ·mean|α|)"),
                        go.Scatter(y=result.distill, name="distillation", yaxis="y2")])
    curves.update_layout(title=f"Training ({result.steps_done} steps, {result.train_seconds:.0f} s)",
                         xaxis={"title": "step"}, yaxis={"title": "loss"},
                         yaxis2={"title": "distillation", "overlaying": "y", "side": "right", "showgrid": False},
                         legend={"orientation": "h", "y": -0.2})
    niah = result.niah
    bars = go.Figure(go.Bar(
        x=["full attention", "Duo streaming", "random streaming"],
        y=[niah["full_mean"], niah["duo_mean"], niah["random_mean"]],
        error_y={"type": "data", "array": [0, 0, niah["random_std"]]}))
    bars.update_layout(title=f"NIAH ROUGE-1 recall, {niah['n_streaming_kv']} KV heads streaming ({result.regime})",
                       yaxis={"range": [0, 1.05]})
    memory = go.Figure(go.Bar(x=[str(m["context"]) for m in result.memory], y=[m["saving"] for m in result.memory]))
    memory.update_layout(title="KV-cache memory saved by the deployment rule",
                         xaxis={"title": "context tokens", "type": "category"},
                         yaxis={"title": "fraction saved", "range": [0, 1]})
    return {"gates": heat, "training": curves, "niah": bars, "memory": memory}


def summary(result: DuoResult) -> str:
    niah = result.niah
    top = ", ".join(f"L{l}KV{g} {float(result.gates[l][g]):.2f}" for l, g in sorted(
        ((l, g) for l in range(len(result.gates)) for g in range(len(result.gates[0]))),
        key=lambda lg: -float(result.gates[lg[0]][lg[1]]))[:5])
    memory = "; ".join(f"{int(m['context'])} tokens: {m['saving']:.0%} saved" for m in result.memory)
    agree = "n/a (no cached retrieval result)" if result.retrieval_spearman is None else f"{result.retrieval_spearman:.3f}"
    return (f"{result.steps_done} steps in {result.train_seconds:.0f} s; final loss {result.losses[-1]:.4f}\n"
            f"highest gates: {top}\n"
            f"NIAH ({result.regime}, {len(niah['full'])} samples, {niah['n_streaming_kv']} streaming KV heads): "
            f"full {niah['full_mean']:.3f}, Duo {niah['duo_mean']:.3f}, random {niah['random_mean']:.3f} "
            f"± {niah['random_std']:.3f}\n"
            f"Spearman(gates, profiling baseline) {result.profiling_spearman:.3f}; "
            f"Spearman(gates, retrieval scores per KV group) {agree}\nKV cache: {memory}")
