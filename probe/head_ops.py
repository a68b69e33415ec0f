"""Head interventions as typed values, and the tensor operations that carry them out on either path.

An `Intervention` names a kind (`Kind`), query heads, and where it applies (positions `start`/`stop`,
batch `rows`). The operations on a head's output z (`apply_z_ops`) and DuoAttention's keep-mask
(`streaming_keep`) are shared by the bridge's hooks (`probe.interventions`) and the fused path
(`probe.fused`), so both apply the same arithmetic; what each kind touches is tabled in
`probe.interventions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from probe.errors import InterventionError
from probe.heads import Head, format_heads

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
# kinds that act on a head's output z: at hook_z on the bridge, at the output projection's input on the fused path
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
        raise InterventionError(f"No mean-ablation mean for {format_heads(missing)}; compute them with head_means().")
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
            raise InterventionError("Mean ablation needs the heads' means (head_means()).")
        return mean_ablation(heads, means, **where)
    if method == "uniform":
        return uniform_attention(heads, **where)
    raise InterventionError(f"Unknown ablation {method!r}; choose zero, mean or uniform "
                            "(resample needs a source prompt: resample_ablation()).")


# ---- the operations on a head's tensors --------------------------------------------------------------

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
