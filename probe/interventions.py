"""Head interventions as typed specs, applied as TransformerLens hooks inside a context manager.

What each kind touches (all per *query* head, so grouped-query attention is exact: the other query
heads that share the key/value head are left alone):

| kind           | hook                           | operation on head h                                      |
|----------------|--------------------------------|----------------------------------------------------------|
| ZERO           | `blocks.{l}.attn.hook_z`       | z[h] = 0 (the head adds nothing to the residual stream)   |
| MEAN           | `blocks.{l}.attn.hook_z`       | z[h] = its mean over a mean-source prompt set             |
| RESAMPLE       | `blocks.{l}.attn.hook_z`       | z[h] = z[h] from another prompt, position by position     |
| UNIFORM        | `blocks.{l}.attn.hook_attn_scores` | visible scores = 0, so the pattern is 1/n_visible     |
| SCALE_QUERY    | `blocks.{l}.attn.hook_attn_scores` | visible scores × s (== scaling the rotated query by s; soft-capped: cap·tanh(s·atanh(c/cap))) |
| SCALE_VALUE    | `blocks.{l}.attn.hook_z`       | z[h] × s (== scaling the values head h reads: z = A·v)    |
| SCALE_OUTPUT   | `blocks.{l}.attn.hook_z`       | z[h] × s (== scaling the head's output z·W_O)            |
| STREAMING      | `blocks.{l}.attn.hook_attn_scores` | keys outside sink ∪ recent window masked (DuoAttention) |

Notes:
- Query scaling is done on the scores, not on `hook_rot_q`: identical maths (the score is linear in
  the query, masked entries stay masked), and it also holds for QK-norm models (Gemma 3), where a
  scale applied before the norm would be undone.
- Value scaling of one query head is applied on its output (exact, because z is linear in v for a
  fixed pattern); a scale on `hook_v` would hit every query head of the group.
- UNIFORM is the "undifferentiated attention" of Ships at ε = 0 and the retrieval-heads masking.
- `start`/`stop` limit an intervention to absolute positions [start, stop); they stay right during
  cached generation because each hook reads the position offset from the attention scores (on the
  fused path, `probe.fused`, from the KV cache's length).
- `intervene()` records its block on the model (`model.intervening`): `model.logits` / `model.generate`
  hand a block of interventions of any kind to the fused path, which applies the same operations
  (`apply_z_ops`, `streaming_keep`; query scaling and uniform attention on the kernel's query, after
  norms and rotary) with the block's hooks switched off for that call.
- `rows` limits it to some batch rows, so several ablated copies of a prompt run in one batch.
"""


from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probe.architecture import architecture
from probe.errors import InterventionError
from probe.head_ops import (
    ABLATION_KINDS,
    ON_SCORES,
    ON_Z,
    SCALE_KINDS,
    Intervention,
    Kind,
    _position_window,
    _row_index,
    ablation,
    apply_z_ops,
    mean_ablation,
    resample_ablation,
    scale,
    streaming_attention,
    streaming_keep,
    streaming_mask,
    uniform_attention,
    zero_ablation,
)
from probe.heads import Head, validate_heads
from probe.loaded import LoadedModel
from probe.routing import forward_for_hooks

__all__ = ["ABLATION_KINDS", "MEAN_SOURCE_SENTENCES", "ON_SCORES", "ON_Z", "SCALE_KINDS", "Attached", "Intervention",
           "Kind", "ablation", "active_hook_count", "apply_z_ops", "build_hooks", "capture_z", "head_means",
           "intervene", "mean_ablation", "mean_source_prompts", "resample_ablation", "scale", "streaming_attention",
           "streaming_keep", "streaming_mask", "uniform_attention", "z_capture_hooks", "zero_ablation"]


# ---- hooks -------------------------------------------------------------------------------------

def _visible(scores: torch.Tensor) -> torch.Tensor:
    """Keys a query may attend to: the causal/padding/window mask writes the dtype's minimum."""
    return scores > torch.finfo(scores.dtype).min / 2


def _score_softcap(model: LoadedModel, layer: int) -> float | None:
    """The layer's attention-logit soft-cap (Gemma 2), which the bridge applies before `hook_attn_scores`."""
    return architecture(model).attention(layer).softcap


def _scaled_scores(scores: torch.Tensor, factor: float, softcap: float | None) -> torch.Tensor:
    """Scores as if the query were scaled by `factor`: linear without a soft-cap; with one, the hook sees
    c = cap·tanh(x/cap), so the scaled score is cap·tanh(factor·atanh(c/cap))."""
    if softcap is None:
        return scores * factor
    ratio = (scores.float() / softcap).clamp(-1 + 1e-7, 1 - 1e-7)
    return (softcap * torch.tanh(factor * torch.atanh(ratio))).to(scores.dtype)


def build_hooks(model: LoadedModel, interventions: Sequence[Intervention]) -> list[tuple[str, Any]]:
    """The (hook name, function) pairs that carry out `interventions` on `model`."""
    for intervention in interventions:
        validate_heads(intervention.heads, model)
        if intervention.kind in (Kind.MEAN, Kind.RESAMPLE) and intervention.values is None:
            raise InterventionError(f"{intervention.kind.value} ablation needs values.")
    by_layer: dict[int, list[tuple[Intervention, Head]]] = defaultdict(list)
    for intervention in interventions:
        for head in intervention.heads:
            by_layer[head.layer].append((intervention, head))

    hooks: list[tuple[str, Any]] = []
    for layer, ops in sorted(by_layer.items()):
        state = {"offset": 0}
        softcap = _score_softcap(model, layer) if any(i.kind is Kind.SCALE_QUERY for i, _ in ops) else None
        score_ops = [(i, h) for i, h in ops if i.kind in ON_SCORES]
        z_ops = [(i, h) for i, h in ops if i.kind in ON_Z]

        def on_scores(scores: torch.Tensor, hook: Any, score_ops=score_ops, state=state,
                      softcap=softcap) -> torch.Tensor:
            q_len, k_len = scores.shape[-2], scores.shape[-1]
            state["offset"] = k_len - q_len  # the KV cache holds this many earlier positions
            if not score_ops:
                return scores
            scores = scores.clone()
            for intervention, head in score_ops:
                if intervention.kind is Kind.STREAMING:
                    keep = streaming_keep(intervention, state["offset"], scores.shape[0], q_len, k_len,
                                          scores.device)
                    scores[:, head.head] = scores[:, head.head].masked_fill(~keep, torch.finfo(scores.dtype).min)
                    continue
                rows = _row_index(intervention, scores.shape[0])
                lo, hi = _position_window(intervention, state["offset"], q_len)
                block = scores[rows, head.head, lo:hi]
                visible = _visible(block)
                if intervention.kind is Kind.UNIFORM:
                    new = torch.zeros_like(block)
                else:
                    new = _scaled_scores(block, intervention.factor, softcap)
                scores[rows, head.head, lo:hi] = torch.where(visible, new, block)
            return scores

        hooks.append((f"blocks.{layer}.attn.hook_attn_scores", on_scores))
        if z_ops:
            def on_z(z: torch.Tensor, hook: Any, z_ops=z_ops, state=state) -> torch.Tensor:
                return apply_z_ops(z, z_ops, state["offset"])

            hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
    return hooks


@dataclass(eq=False)
class Attached:
    """One open `intervene()` block: its interventions and how many hooks it put on each hook point
    (`id(point)` -> count). Listed on the model (`LoadedModel.intervening`) while the block is open, so
    the core can run a forward of the block on the fused path (`probe.fused`) with these interventions;
    while `handed_over` is set its hooks do nothing (the fused path applies the interventions itself)."""

    interventions: tuple[Intervention, ...]
    points: dict[int, int]
    handed_over: bool = False


def _guarded(record: Attached, fn: Any) -> Any:
    def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        return tensor if record.handed_over else fn(tensor, hook)
    return hook


@contextlib.contextmanager
def intervene(model: LoadedModel, interventions: Intervention | Sequence[Intervention]) -> Iterator[LoadedModel]:
    """Apply interventions for the duration of the block; the hooks are removed on exit, always.

    Works for forward passes, `run_with_cache` and cached generation (`model.generate`). The block is
    also recorded on the model (`model.intervening`), so `model.logits` / `model.generate` may serve it
    on the fused path when it serves every intervention and hook in effect (see `LoadedModel.fused_reason`).
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions)
    hooks = build_hooks(model, interventions)
    hook_dict = getattr(model.bridge, "hook_dict", {})
    points: dict[int, int] = {}
    for name, _ in hooks:
        point = hook_dict.get(name)
        if point is not None:
            points[id(point)] = points.get(id(point), 0) + 1
    record = Attached(tuple(interventions), points)
    stack = getattr(model, "intervening", None)
    known = stack is not None and all(hook_dict.get(name) is not None for name, _ in hooks)
    with model.lock, model.bridge.hooks(fwd_hooks=[(name, _guarded(record, fn)) for name, fn in hooks]):
        if known:
            stack.append(record)
        try:
            yield model
        finally:
            if known:
                del stack[next(i for i, r in enumerate(stack) if r is record)]


def active_hook_count(model: LoadedModel) -> int:
    """Forward hooks currently attached to any hook point (0 when nothing is intervening)."""
    return sum(len(point._forward_hooks) for point in model.bridge.hook_dict.values())


# ---- mean-ablation source prompts ---------------------------------------------------------------

# Plain sentences written by the project: the default texts mean-ablation means are taken over.
MEAN_SOURCE_SENTENCES: tuple[str, ...] = (
    "The weather was mild, so we walked to the market after lunch.",
    "She opened the window and listened to the rain on the roof.",
    "Our train left the station a few minutes later than planned.",
    "He wrote the numbers on a card and put it in his pocket.",
    "The museum keeps old maps, coins and letters from many countries.",
    "After the meeting, the team went back to work on the new design.",
    "A small dog slept in the sun next to the garden wall.",
    "They cooked rice and vegetables for dinner and talked about the trip.",
)


def mean_source_prompts(model: LoadedModel, texts: Sequence[str] = MEAN_SOURCE_SENTENCES) -> list[torch.Tensor]:
    """Token ids of the mean-source sentences, ready for `head_means`."""
    return [model.encode(text) for text in texts]


def z_capture_hooks(layers: Sequence[int]) -> tuple[list[tuple[str, Any]], dict[int, torch.Tensor]]:
    """Hooks that keep each layer's first `hook_z` `[batch, pos, n_heads, d_head]` (detached) of a forward, and
    the dict they fill (layer -> z). `hook_z` fires on the fused path too (the output projection's input)."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def grab(z: torch.Tensor, hook: Any) -> torch.Tensor:
            captured.setdefault(layer, z.detach())
            return z
        return grab

    return [(f"blocks.{layer}.attn.hook_z", keep(layer)) for layer in layers], captured


@torch.no_grad()
def capture_z(model: LoadedModel, ids: torch.Tensor, heads: Sequence[Head]) -> dict[Head, torch.Tensor]:
    """Each head's z `[batch, pos, d_head]` on `ids` (for resampling or means), under the open `intervene()`
    blocks; on the fused path where that is exact (`probe.routing.forward_for_hooks`: z read at the output
    projection's input, no pattern materialised), else through the bridge."""
    validate_heads(heads, model)
    hooks, captured = z_capture_hooks(sorted({h.layer for h in heads}))
    with model.hooks(hooks), forward_for_hooks(model) as run:  # holds model.lock (no_grad: the decorator)
        run(ids)
    return {h: captured[h.layer][:, :, h.head].clone() for h in heads}


@torch.no_grad()
def head_means(model: LoadedModel, prompts: Sequence[torch.Tensor], heads: Sequence[Head],
               per_position: bool = False) -> dict[Head, torch.Tensor]:
    """Mean z of each head over a mean-source prompt set: `[d_head]`, or `[pos, d_head]` if `per_position`.

    Per-position means need prompts of one length (they are averaged position by position).
    """
    if not prompts:
        raise InterventionError("Mean ablation needs at least one mean-source prompt.")
    if per_position and len({p.shape[-1] for p in prompts}) != 1:
        raise InterventionError("Per-position means need mean-source prompts of one token length.")
    sums: dict[Head, torch.Tensor] = {}
    count = 0
    for ids in prompts:
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        z = capture_z(model, ids, heads)
        for head, value in z.items():  # summed in float32 (a bf16 sum over many positions loses digits)
            part = value.float().sum(0) if per_position else value.float().sum((0, 1))
            sums[head] = sums[head] + part.to(sums[head].device) if head in sums else part
        count += ids.shape[0] if per_position else ids.shape[0] * ids.shape[1]
    return {head: total / count for head, total in sums.items()}  # applied in the hooked tensor's dtype/device
