"""Node attribution patching baselines (EAP / AtP and EAP-IG) on head outputs, and the MIB area metrics.

Nodes are heads at `hook_z` (per position), as CD-T's and path patching's are. With m the logit
difference summed over a batch's prompts:

- EAP: score(h) = mean over prompts of Σ_pos (a_corr − a_clean) · ∂m/∂a at the clean run: a
  first-order estimate of m(patched) − m(clean). `corrupt="mean"` (the comparison's default) takes
  a_corr = the per-position mean μ that path patching patches in and the faithfulness
  evaluation ablates with; since the estimate is linear in a_corr, that equals the average over
  every pairing with a mean-source prompt. `corrupt="counterfactual"` pairs prompt i with mean-source
  prompt i mod R instead.
- EAP-IG: the same difference (paired counterfactual) times the gradient averaged over K points of
  the straight path of the token embeddings from the counterfactual to the clean prompt,
  x_k = x' + k/K (x − x'), k = 1..K (K = 1 is EAP at the clean run).

∂m/∂a is the total derivative (through every later layer): each layer's z gets an additive zero
leaf δ that requires grad, and ∂m/∂δ is read by one backward per path point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analyses.cdt.arch import CDTError
from analyses.cdt.circuits import ScoreFn, batch_means
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head

EMBED_HOOK = "embed.hook_out"  # the bridge's token-embedding output (positions are added separately)


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@torch.no_grad()
def _capture(model, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Every layer's z `[B, T, H, d_head]` and the token embeddings of one forward."""
    names = {_z_name(layer) for layer in range(model.n_layers)} | {EMBED_HOOK}
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    if EMBED_HOOK not in cache:
        raise CDTError(f"This model's bridge has no {EMBED_HOOK!r} hook; EAP-IG needs the token embeddings.")
    return {layer: cache[_z_name(layer)] for layer in range(model.n_layers)}, cache[EMBED_HOOK]


def _gradients(model, ids: torch.Tensor, batch: LogitDiffBatch, embed: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """∂(Σ_rows logit(good) − logit(bad) at the last position)/∂z of every layer, optionally with the
    token embeddings replaced by `embed` (a point of the IG path)."""
    deltas: dict[int, torch.Tensor] = {}

    def on_z(z: torch.Tensor, hook) -> torch.Tensor:
        layer = int(hook.name.split(".")[1])
        delta = torch.zeros_like(z, requires_grad=True)
        deltas[layer] = delta
        return z + delta

    hooks = [(_z_name(layer), on_z) for layer in range(model.n_layers)]
    if embed is not None:
        hooks.append((EMBED_HOOK, lambda e, hook: embed.to(e.dtype)))
    with torch.enable_grad(), model.hooks(hooks):
        logits = model.bridge(ids)[:, -1]
        rows = torch.arange(ids.shape[0], device=logits.device)
        metric = (logits[rows, batch.good.to(logits.device)] - logits[rows, batch.bad.to(logits.device)]).sum()
        layers = sorted(deltas)
        grads = torch.autograd.grad(metric, [deltas[layer] for layer in layers], allow_unused=True)
    return {layer: (torch.zeros_like(deltas[layer]) if g is None else g.detach()) for layer, g in zip(layers, grads)}


def counterfactual_ids(batch: LogitDiffBatch) -> torch.Tensor:
    """Prompt i's counterfactual: mean-source prompt i mod R (same template, so the same length)."""
    R = batch.mean_source_ids.shape[0]
    index = torch.arange(batch.n_prompts) % R
    return batch.mean_source_ids[index.to(batch.mean_source_ids.device)]


def attribution_scores(model, batches: Sequence[LogitDiffBatch], steps: int = 1, corrupt: str = "mean",
                       means: Sequence[dict[Head, torch.Tensor]] | None = None) -> torch.Tensor:
    """`[L, H]` estimated patching effect per head (mean over prompts): EAP for `steps=1`, EAP-IG
    with `steps` points along the embedding path (which always uses the paired counterfactual)."""
    if steps < 1:
        raise CDTError("steps must be at least 1.")
    if corrupt not in ("mean", "counterfactual"):
        raise CDTError(f"Unknown corrupt {corrupt!r}; choose mean or counterfactual.")
    if steps > 1 and corrupt != "counterfactual":
        raise CDTError("EAP-IG interpolates the embeddings of a counterfactual prompt: use corrupt='counterfactual'.")
    L, H = model.n_layers, model.n_heads
    totals = torch.zeros(L, H, dtype=torch.float64)
    count = 0
    for index, batch in enumerate(batches):
        clean_z, clean_embed = _capture(model, batch.ids)
        cf = counterfactual_ids(batch)
        if corrupt == "mean":
            mu = means[index] if means is not None else batch_means(model, batch)
            corr_z = {layer: torch.stack([mu[Head(layer, h)] for h in range(H)], dim=1)[None]
                      for layer in range(L)}  # [1, T, H, d_head]
            cf_embed = None
        else:
            corr_z, cf_embed = _capture(model, cf)
        mean_grad = {layer: torch.zeros_like(clean_z[layer], dtype=torch.float64) for layer in range(L)}
        for k in range(1, steps + 1):
            if steps == 1:
                grads = _gradients(model, batch.ids, batch, None)
            else:
                alpha = k / steps
                grads = _gradients(model, batch.ids, batch, cf_embed + alpha * (clean_embed - cf_embed))
            for layer in range(L):
                mean_grad[layer] += grads[layer].double() / steps
        for layer in range(L):
            diff = (corr_z[layer] - clean_z[layer]).double()
            totals[layer] += (diff * mean_grad[layer]).sum(dim=(0, 1, 3)).cpu()
        count += batch.n_prompts
    return totals / count


def attribution_score_fn(model, batches: Sequence[LogitDiffBatch], steps: int = 1, corrupt: str = "mean",
                         means: Sequence[dict[Head, torch.Tensor]] | None = None) -> ScoreFn:
    """A `ScoreFn` for `iterative_search(..., upstream_only=False)`: node scores to the metric, computed
    once (nodes have no per-target scores: later iterations take the next ranked heads)."""
    scores = attribution_scores(model, batches, steps, corrupt, means)

    def score(targets: list[Head] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return scores.clone(), {"logits": scores.clone()}

    return score


# ---- MIB area metrics --------------------------------------------------------------------------------

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def sizes_for(n_heads: int, fractions: Sequence[float] = MIB_FRACTIONS) -> list[int]:
    """Circuit sizes (heads) for the fractions, rounded up (at least 1)."""
    import math

    return [max(1, min(n_heads, math.ceil(f * n_heads - 1e-9))) for f in fractions]


def trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    """∫ y dx by the trapezoid rule over the given points (sorted by x)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise CDTError("An area needs at least two points, one y per x.")
    pairs = sorted(zip(xs, ys))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]))


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit performance ratio: area under f over the fraction axis (higher is better)."""
    return trapezoid(fractions, faithfulness)


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit-model difference: area under |1 − f| over the fraction axis (lower is better)."""
    return trapezoid(fractions, [abs(1.0 - f) for f in faithfulness])
