"""Interactive exploration: attention patterns, a head's direct logit attribution, the logit lens.

Small, prompt-level computations behind the app's attention explorer (and usable in notebooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from probe.heads import Head, validate_heads
from probe.models import LoadedModel
from probe.readout import direction_logits, frozen_final_norm, is_layer_norm, unembed


@dataclass
class PromptView:
    """Everything the explorer shows for one prompt: tokens, patterns of one layer, readouts."""

    tokens: list[str]
    layer: int
    patterns: torch.Tensor  # [n_heads, q, k]
    head_outputs: torch.Tensor  # [n_heads, d_model] at the last position
    final_scale: torch.Tensor  # [1] final-norm scale at the last position
    resid: torch.Tensor  # [n_layers + 1, d_model] residual stream at the last position


@torch.no_grad()
def view_prompt(model: LoadedModel, prompt: str, layer: int) -> PromptView:
    """One forward pass caching only what the explorer needs."""
    validate_heads([Head(layer, 0)], model)
    ids = model.encode(prompt)
    model.check_fits(ids.shape[-1])
    last = model.n_layers - 1
    wanted = {f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_z", "ln_final.hook_scale",
              "blocks.0.hook_resid_pre"} | {f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)}
    with model.lock:
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda name: name in wanted)
    z = cache[f"blocks.{layer}.attn.hook_z"][0, -1]  # [n_heads, d_head]
    head_outputs = torch.einsum("hd,hdm->hm", z, model.bridge.W_O[layer])
    resid = torch.stack([cache["blocks.0.hook_resid_pre"][0, -1]]
                        + [cache[f"blocks.{i}.hook_resid_post"][0, -1] for i in range(last + 1)])
    return PromptView(model.token_strings(ids), layer, cache[f"blocks.{layer}.attn.hook_pattern"][0].cpu(),
                      head_outputs, cache["ln_final.hook_scale"][0, -1], resid)


def head_top_tokens(model: LoadedModel, view: PromptView, head: int, k: int = 10) -> list[tuple[str, float]]:
    """Tokens the head's output at the last position pushes up most (direct logit attribution)."""
    logits = direction_logits(model, view.head_outputs[head], view.final_scale)
    values, indices = logits.topk(k)
    return [(model.decode([int(i)]), float(v)) for v, i in zip(values, indices)]


def logit_lens(model: LoadedModel, view: PromptView, k: int = 1) -> list[list[tuple[str, float]]]:
    """Top-k next tokens (probabilities) read from the residual stream after each layer.

    Each layer's stream is normalised with its own RMS/LayerNorm scale (the usual logit lens).
    """
    rows = []
    for x in view.resid:
        scale = (x - x.mean() if is_layer_norm(model) else x).pow(2).mean().add(1e-6).sqrt()
        probs = torch.softmax(unembed(model, frozen_final_norm(model, x, scale)), dim=-1)
        values, indices = probs.topk(k)
        rows.append([(model.decode([int(i)]), float(v)) for v, i in zip(values, indices)])
    return rows


def pattern_figure(view: PromptView, head: int) -> go.Figure:
    labels = [f"{i}:{t!r}" for i, t in enumerate(view.tokens)]
    figure = go.Figure(go.Heatmap(z=view.patterns[head].numpy(), x=labels, y=labels, colorscale="Blues",
                                  zmin=0, zmax=1, colorbar={"title": "attention"}))
    figure.update_layout(title=f"L{view.layer}H{head} attention (rows: queries, columns: keys)",
                         yaxis={"autorange": "reversed"}, height=520, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure


def lens_figure(rows: list[list[tuple[str, float]]]) -> go.Figure:
    layers = ["embed"] + [f"L{i}" for i in range(len(rows) - 1)]
    figure = go.Figure(go.Bar(x=layers, y=[r[0][1] for r in rows], text=[repr(r[0][0]) for r in rows],
                              textposition="outside"))
    figure.update_layout(title="logit lens: top next token after each layer", yaxis={"title": "probability",
                         "range": [0, 1.1]}, height=380, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure
