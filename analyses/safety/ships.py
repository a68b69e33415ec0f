"""Ships (query level): KL(p_base || p_ablated) of the next-token distribution at the last prompt
position for every query head, exact (batched, or the paper's loop as reference) or screened to first order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analyses.safety.errors import SafetyError
from analyses.safety.readouts import ABLATIONS, ablate, ablated_readouts, clean_run
from probe.architecture import architecture
from probe.heads import Head
from probe.interventions import intervene
from probe.models import LoadedModel
from probe.results import HeadScores


def kl_divergence(base_log_probs: torch.Tensor, ablated_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_ablated) in nats along the last axis, from log-probabilities (fp32, no +1e-12)."""
    base = base_log_probs.float()
    return (base.exp() * (base - ablated_log_probs.float())).sum(-1).clamp_min(0.0)


@torch.no_grad()
def ships_query(model: LoadedModel, ids: torch.Tensor, ablation: str = "query", epsilon: float = 1e-5,
                heads: Sequence[Head] | None = None, batch_rows: int = 32, fast: bool = True) -> torch.Tensor:
    """Ships of every head (or `heads`) for one prompt: `[n_layers, n_heads]` KL in nats (NaN = not scored)."""
    model.check_fits(ids.shape[-1])
    heads = list(heads) if heads is not None else model.all_heads()
    clean = clean_run(model, ids, keep_residual=fast)
    _, log_probs = ablated_readouts(model, clean, [[h] for h in heads], ablation, epsilon, batch_rows, True, fast)
    scores = torch.full((model.n_layers, model.n_heads), float("nan"))
    kls = kl_divergence(clean.log_probs.cpu().unsqueeze(0), log_probs)  # type: ignore[arg-type]
    for head, kl in zip(heads, kls):
        scores[head.layer, head.head] = kl
    return scores


@torch.no_grad()
def ships_query_reference(model: LoadedModel, ids: torch.Tensor, ablation: str = "query", epsilon: float = 1e-5,
                          heads: Sequence[Head] | None = None) -> torch.Tensor:
    """The paper's loop, kept slow on purpose: one full forward pass per head (reference and bench)."""
    heads = list(heads) if heads is not None else model.all_heads()
    base = torch.log_softmax(model.logits(ids, positions="last")[0, -1].float(), dim=-1)
    scores = torch.full((model.n_layers, model.n_heads), float("nan"))
    for head in heads:
        with intervene(model, ablate([head], ablation, epsilon)):
            ablated = torch.log_softmax(model.logits(ids, positions="last")[0, -1].float(), dim=-1)
        scores[head.layer, head.head] = kl_divergence(base, ablated)
    return scores


def ablated_z_delta(z: torch.Tensor, v: torch.Tensor, ablation: str, epsilon: float, model: LoadedModel,
                    window: int | None = None) -> torch.Tensor:
    """z_ablated - z for every query head of one layer at once, `[B, T, H, d_head]`.

    UA (`query`): with the query scaled by epsilon -> 0 the pattern becomes uniform over the keys the
    query sees, so z -> the mean of the head's values (its KV group's, under GQA) over the causal
    prefix, or over the last `window` positions on a sliding-window layer (key k visible from query q
    iff q - k < window; `architecture(model).attention(layer).window`). Exact at epsilon = 0.
    SC (`output`): z -> epsilon * z.
    """
    if ablation == "output":
        return (epsilon - 1.0) * z
    if v.shape[2] != z.shape[2]:  # GQA: each query head reads its KV head's values
        v = v[:, :, [model.kv_head_of(h) for h in range(z.shape[2])]]
    length = v.shape[1]
    sums = v.cumsum(1)
    counts = torch.arange(1, length + 1, device=v.device, dtype=v.dtype)
    if window is not None and window < length:
        sums = sums.clone()
        sums[:, window:] = sums[:, window:] - sums[:, :-window]  # sum over (q - window, q]
        counts = counts.clamp(max=window)
    return sums / counts.view(1, -1, 1, 1) - z


def ships_first_order(model: LoadedModel, ids: torch.Tensor, ablation: str = "query", epsilon: float = 1e-5,
                      top_tokens: int = 8) -> torch.Tensor:
    """Estimated Ships of every head from one batched forward and one backward pass: `[n_layers, n_heads]`.

    Why: the exact Ships needs one (partial) forward per head; a screen finds the few heads worth
    scoring exactly. The change of each next-token logit is linearised, dl ~ grad(l) . (z_ablated - z)
    (attribution patching), for the `top_tokens` most likely tokens; the rest of the vocabulary is one
    bucket shifted by the mean change of its logits (the gradient of their plain mean). The KL is then
    computed exactly on those top tokens + the bucket, so a saturated distribution (p_top ~ 1), where a
    quadratic KL expansion vanishes, still gets a useful estimate. It is a ranking screen: magnitudes
    are not calibrated (the linearisation misses effects through the final norm), so rescore its top
    heads exactly (`ships_screened`).
    The prompt runs as `top_tokens + 1` identical batch rows, each backpropagating its own target, so
    one backward gives every row's gradient with respect to every head's output at every position.
    """
    if ablation not in ABLATIONS:
        raise SafetyError(f"Unknown ablation {ablation!r}; choose query (UA) or output (SC).")
    model.check_fits(ids.shape[-1])
    rows = top_tokens + 1
    batch = ids.to(model.device).expand(rows, -1)
    deltas: dict[int, torch.Tensor] = {}
    zs: dict[int, torch.Tensor] = {}
    vs: dict[int, torch.Tensor] = {}

    def on_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
        layer = int(hook.name.split(".")[1])
        zs[layer] = z[:1].detach()
        deltas[layer] = torch.zeros_like(z, requires_grad=True)  # d(target)/d(delta) = d(target)/dz
        return z + deltas[layer]

    def on_v(v: torch.Tensor, hook: Any) -> None:
        vs[int(hook.name.split(".")[1])] = v[:1].detach()

    hooks = [(f"blocks.{layer}.attn.hook_z", on_z) for layer in range(model.n_layers)]
    hooks += [(f"blocks.{layer}.attn.hook_v", on_v) for layer in range(model.n_layers)]
    with model.lock, torch.enable_grad():
        last = model.bridge.run_with_hooks(batch, fwd_hooks=hooks)[:, -1].float()  # [rows, vocab]
        probs = torch.softmax(last[0].detach(), dim=-1)
        tokens = probs.topk(top_tokens).indices
        tail_mean = torch.ones_like(probs).index_fill_(0, tokens, 0.0)
        tail_mean = tail_mean / tail_mean.sum()
        target = last[torch.arange(top_tokens), tokens].sum() + (last[top_tokens] * tail_mean).sum()
        grads = torch.autograd.grad(target, [deltas[layer] for layer in range(model.n_layers)])
    base = torch.log_softmax(last[0].detach().double(), dim=-1).cpu()
    top_log_p = base[tokens.cpu()]
    tail = torch.ones(1, dtype=torch.float64) - top_log_p.exp().sum()
    tail_log_p = torch.log(tail.clamp_min(1e-300))
    log_p = torch.cat([top_log_p, tail_log_p])  # [top_tokens + 1]: top tokens, then the bucket
    estimate = torch.empty((model.n_layers, model.n_heads))
    for layer, grad in enumerate(grads):
        change = ablated_z_delta(zs[layer], vs[layer], ablation, epsilon, model,
                                 architecture(model).attention(layer).window)  # [1, T, H, d]
        dl = (grad * change).sum(dim=(1, 3)).cpu().double()  # [rows, H]: logit change of each target row
        shifted = log_p[:, None] + dl  # ablated log-probs up to a constant; the bucket moves by its mean
        log_q = shifted - torch.logsumexp(shifted, dim=0, keepdim=True)
        estimate[layer] = (log_p.exp()[:, None] * (log_p[:, None] - log_q)).sum(0).clamp_min(0.0).float()
    return estimate


def ships_screened(model: LoadedModel, ids: torch.Tensor, ablation: str = "query", epsilon: float = 1e-5,
                   rescore: int = 40, top_tokens: int = 8, batch_rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate, exact) for every head: the first-order screen, then exact Ships for its `rescore` best heads.

    `exact` is NaN outside the rescored heads; where it is set it equals `ships_query` for that head.
    """
    estimate = ships_first_order(model, ids, ablation, epsilon, top_tokens)
    chosen = [head for head, _ in HeadScores("estimate", "nats", estimate).top(rescore)]
    exact = ships_query(model, ids, ablation, epsilon, heads=chosen, batch_rows=batch_rows)
    return estimate, exact
