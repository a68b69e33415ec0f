"""Head interventions as typed specs, applied as TransformerLens hooks inside a context manager.

What each kind touches (all per *query* head, so grouped-query attention is exact: the other query
heads that share the key/value head are left alone):

| kind           | hook                           | operation on head h                                      |
|----------------|--------------------------------|----------------------------------------------------------|
| ZERO           | `blocks.{l}.attn.hook_z`       | z[h] = 0 (the head adds nothing to the residual stream)   |
| MEAN           | `blocks.{l}.attn.hook_z`       | z[h] = its mean over a reference prompt set               |
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from probe.errors import InterventionError
from probe.heads import Head, format_heads, validate_heads


class Kind(Enum):
    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"
    UNIFORM = "uniform"
    SCALE_QUERY = "scale_query"
    SCALE_VALUE = "scale_value"
    SCALE_OUTPUT = "scale_output"
    STREAMING = "streaming"


ON_SCORES = {Kind.UNIFORM, Kind.SCALE_QUERY, Kind.STREAMING}
ON_Z = {Kind.ZERO, Kind.MEAN, Kind.RESAMPLE, Kind.SCALE_VALUE, Kind.SCALE_OUTPUT}
SCALE_KINDS = {"query": Kind.SCALE_QUERY, "value": Kind.SCALE_VALUE, "output": Kind.SCALE_OUTPUT}
ABLATION_KINDS = {"zero": Kind.ZERO, "mean": Kind.MEAN, "resample": Kind.RESAMPLE, "uniform": Kind.UNIFORM}


@dataclass(frozen=True)
class Intervention:
    """One intervention on a set of query heads. Build with the helper functions below."""

    kind: Kind
    heads: tuple[Head, ...]
    factor: float = 1.0
    values: Mapping[Head, torch.Tensor] | None = field(default=None, compare=False)
    start: int = 0
    stop: int | None = None
    rows: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None  # STREAMING: (sink tokens, recent tokens)

    def describe(self) -> str:
        what = {
            Kind.ZERO: "zero-ablate", Kind.MEAN: "mean-ablate", Kind.RESAMPLE: "resample-ablate",
            Kind.UNIFORM: "uniform-attention", Kind.SCALE_QUERY: f"scale query x{self.factor:g}",
            Kind.SCALE_VALUE: f"scale value x{self.factor:g}", Kind.SCALE_OUTPUT: f"scale output x{self.factor:g}",
            Kind.STREAMING: "streaming attention (sink {}, recent {})".format(*(self.window or (0, 0))),
        }[self.kind]
        where = "" if (self.start == 0 and self.stop is None) else f" at positions [{self.start}, {self.stop or 'end'})"
        rows = "" if self.rows is None else f" on batch rows {list(self.rows)}"
        return f"{what} {format_heads(self.heads)}{where}{rows}"


def zero_ablation(heads: Sequence[Head], **where: Any) -> Intervention:
    return Intervention(Kind.ZERO, tuple(heads), **where)


def mean_ablation(heads: Sequence[Head], means: Mapping[Head, torch.Tensor], **where: Any) -> Intervention:
    """`means[head]` is `[d_head]` (averaged over positions) or `[pos, d_head]` (per position)."""
    missing = [h for h in heads if h not in means]
    if missing:
        raise InterventionError(f"No reference mean for {format_heads(missing)}; compute them with head_means().")
    return Intervention(Kind.MEAN, tuple(heads), values=dict(means), **where)


def resample_ablation(heads: Sequence[Head], source_z: Mapping[Head, torch.Tensor], **where: Any) -> Intervention:
    """`source_z[head]` is `[pos, d_head]` from another prompt (see `capture_z`), or `[batch, pos, d_head]`
    with one source per batch row."""
    return Intervention(Kind.RESAMPLE, tuple(heads), values=dict(source_z), **where)


def uniform_attention(heads: Sequence[Head], **where: Any) -> Intervention:
    return Intervention(Kind.UNIFORM, tuple(heads), **where)


def streaming_attention(heads: Sequence[Head], sink: int, recent: int, **where: Any) -> Intervention:
    """Each query sees only the first `sink` keys and the `recent` keys up to itself (DuoAttention's
    streaming heads); `start=prompt_len` restricts decoding only, `start=0` every position."""
    if sink < 0 or recent < 1:
        raise InterventionError(f"Streaming attention needs sink >= 0 and recent >= 1, got {sink}, {recent}.")
    return Intervention(Kind.STREAMING, tuple(heads), window=(int(sink), int(recent)), **where)


def streaming_mask(q_positions: torch.Tensor, k_len: int, sink: int, recent: int) -> torch.Tensor:
    """`[q, k]` True where key j is in sink ∪ recent for the query at absolute position t (causality is
    left to the model's own mask)."""
    keys = torch.arange(k_len, device=q_positions.device)
    return (keys.unsqueeze(0) < sink) | (keys.unsqueeze(0) > q_positions.unsqueeze(1) - recent)


def scale(heads: Sequence[Head], component: str, factor: float, **where: Any) -> Intervention:
    """Scale a head's `query`, `value` or `output` by `factor` (negative allowed)."""
    if component not in SCALE_KINDS:
        raise InterventionError(f"Cannot scale {component!r}; choose query, value or output.")
    return Intervention(SCALE_KINDS[component], tuple(heads), factor=float(factor), **where)


def ablation(heads: Sequence[Head], method: str, means: Mapping[Head, torch.Tensor] | None = None,
             **where: Any) -> Intervention:
    """Ablation by name (`zero`, `mean`, `uniform`), for faces that take the method as text."""
    if method == "zero":
        return zero_ablation(heads, **where)
    if method == "mean":
        if means is None:
            raise InterventionError("Mean ablation needs reference means (head_means()).")
        return mean_ablation(heads, means, **where)
    if method == "uniform":
        return uniform_attention(heads, **where)
    raise InterventionError(f"Unknown ablation {method!r}; choose zero, mean or uniform "
                            "(resample needs a source prompt: resample_ablation()).")


# ---- hooks -------------------------------------------------------------------------------------

def _visible(scores: torch.Tensor) -> torch.Tensor:
    """Keys a query may attend to: the causal/padding/window mask writes the dtype's minimum."""
    return scores > torch.finfo(scores.dtype).min / 2


def _row_index(intervention: Intervention, batch: int) -> slice | list[int]:
    if intervention.rows is None:
        return slice(None)
    bad = [r for r in intervention.rows if not 0 <= r < batch]
    if bad:
        raise InterventionError(f"Batch rows {bad} do not exist in a batch of {batch}.")
    return list(intervention.rows)


def _position_window(intervention: Intervention, offset: int, length: int) -> tuple[int, int]:
    """Local [lo, hi) of the current chunk covered by the absolute window [start, stop)."""
    lo = max(intervention.start - offset, 0)
    hi = length if intervention.stop is None else min(intervention.stop - offset, length)
    return lo, max(lo, hi)


def _replacement(intervention: Intervention, head: Head, offset: int, lo: int, hi: int,
                 like: torch.Tensor, rows: slice | list[int]) -> torch.Tensor:
    """The values written into z: `[d_head]` (broadcast), `[pos, d_head]` (per position) or
    `[batch, pos, d_head]` (per batch row and position, e.g. a different source prompt per row)."""
    value = intervention.values[head].to(like.device, like.dtype)  # type: ignore[index]
    if value.dim() == 1:
        return value
    if offset + hi > value.shape[-2]:
        raise InterventionError(
            f"{intervention.kind.value} values for {head} cover {value.shape[-2]} positions but the "
            f"prompt reaches position {offset + hi}; use averaged means or a source prompt as long."
        )
    if value.dim() == 3:
        if value.shape[0] != like.shape[0]:
            raise InterventionError(f"Per-row values for {head} have {value.shape[0]} rows; the batch has {like.shape[0]}.")
        return value[rows, offset + lo: offset + hi]
    return value[offset + lo: offset + hi]


def apply_z_ops(z: torch.Tensor, ops: Sequence[tuple[Intervention, Head]], offset: int) -> torch.Tensor:
    """z `[batch, pos, n_heads, d_head]` with the head-output operations (ZERO, MEAN, RESAMPLE, SCALE_VALUE,
    SCALE_OUTPUT) written into their query heads' slices, in order; `offset` = positions already in the KV
    cache before this chunk (for `start`/`stop` and per-position values). Returns a new tensor. Used on
    `hook_z` here and on the output projection's input by the fused path (`probe.fused`)."""
    z = z.clone()
    for intervention, head in ops:
        if intervention.kind not in ON_Z:
            raise InterventionError(f"{intervention.describe()} does not act on a head's output z.")
        rows = _row_index(intervention, z.shape[0])
        lo, hi = _position_window(intervention, offset, z.shape[1])
        if hi <= lo:
            continue
        if intervention.kind is Kind.ZERO:
            z[rows, lo:hi, head.head] = 0.0
        elif intervention.kind in (Kind.SCALE_VALUE, Kind.SCALE_OUTPUT):
            z[rows, lo:hi, head.head] = z[rows, lo:hi, head.head] * intervention.factor
        else:
            z[rows, lo:hi, head.head] = _replacement(intervention, head, offset, lo, hi, z, rows)
    return z


def streaming_keep(intervention: Intervention, offset: int, batch: int, q_len: int, k_len: int,
                   device: Any = None) -> torch.Tensor:
    """`[batch, q_len, k_len]` bool: False where a STREAMING intervention hides key j from the query (outside
    sink ∪ recent window, on its rows and in its position window), True elsewhere (causality and padding
    are left to the model's own mask). The same keep-mask masks the bridge's scores and, ANDed into the
    layer's mask, the fused path's SDPA call."""
    if intervention.kind is not Kind.STREAMING or intervention.window is None:
        raise InterventionError(f"{intervention.describe()} is not streaming attention.")
    keep = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=device)
    rows = _row_index(intervention, batch)
    lo, hi = _position_window(intervention, offset, q_len)
    if hi > lo:
        q_positions = torch.arange(lo, hi, device=device) + offset
        keep[rows, lo:hi] = streaming_mask(q_positions, k_len, *intervention.window)
    return keep


def _score_softcap(model: Any, layer: int) -> float | None:
    """The layer's attention-logit soft-cap (Gemma 2), which the bridge applies before `hook_attn_scores`."""
    from probe.architecture import architecture

    return architecture(model).attention(layer).softcap


def _scaled_scores(scores: torch.Tensor, factor: float, softcap: float | None) -> torch.Tensor:
    """Scores as if the query were scaled by `factor`: linear without a soft-cap; with one, the hook sees
    c = cap·tanh(x/cap), so the scaled score is cap·tanh(factor·atanh(c/cap))."""
    if softcap is None:
        return scores * factor
    ratio = (scores.float() / softcap).clamp(-1 + 1e-7, 1 - 1e-7)
    return (softcap * torch.tanh(factor * torch.atanh(ratio))).to(scores.dtype)


def build_hooks(model: Any, interventions: Sequence[Intervention]) -> list[tuple[str, Any]]:
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
def intervene(model: Any, interventions: Intervention | Sequence[Intervention]) -> Iterator[Any]:
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


def active_hook_count(model: Any) -> int:
    """Forward hooks currently attached to any hook point (0 when nothing is intervening)."""
    return sum(len(point._forward_hooks) for point in model.bridge.hook_dict.values())


# ---- reference activations ---------------------------------------------------------------------

# Plain sentences written by the project: the default reference set for mean ablation.
REFERENCE_SENTENCES: tuple[str, ...] = (
    "The weather was mild, so we walked to the market after lunch.",
    "She opened the window and listened to the rain on the roof.",
    "Our train left the station a few minutes later than planned.",
    "He wrote the numbers on a card and put it in his pocket.",
    "The museum keeps old maps, coins and letters from many countries.",
    "After the meeting, the team went back to work on the new design.",
    "A small dog slept in the sun next to the garden wall.",
    "They cooked rice and vegetables for dinner and talked about the trip.",
)


def reference_prompts(model: Any, texts: Sequence[str] = REFERENCE_SENTENCES) -> list[torch.Tensor]:
    """Token ids of the reference sentences, ready for `head_means`."""
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
def capture_z(model: Any, ids: torch.Tensor, heads: Sequence[Head]) -> dict[Head, torch.Tensor]:
    """Each head's z `[batch, pos, d_head]` on `ids` (for resampling or means), under the open `intervene()`
    blocks; on the fused path where that is exact (`probe.forward.forward_for_hooks`: z read at the output
    projection's input, no pattern materialised), else through the bridge."""
    from probe.forward import forward_for_hooks

    validate_heads(heads, model)
    hooks, captured = z_capture_hooks(sorted({h.layer for h in heads}))
    with model.hooks(hooks), forward_for_hooks(model) as run:  # holds model.lock (no_grad: the decorator)
        run(ids)
    return {h: captured[h.layer][:, :, h.head].clone() for h in heads}


@torch.no_grad()
def head_means(model: Any, prompts: Sequence[torch.Tensor], heads: Sequence[Head],
               per_position: bool = False) -> dict[Head, torch.Tensor]:
    """Mean z of each head over a reference set: `[d_head]`, or `[pos, d_head]` if `per_position`.

    Per-position means need prompts of one length (they are averaged position by position).
    """
    if not prompts:
        raise InterventionError("Mean ablation needs at least one reference prompt.")
    if per_position and len({p.shape[-1] for p in prompts}) != 1:
        raise InterventionError("Per-position means need reference prompts of one token length.")
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
