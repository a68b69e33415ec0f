"""Attention rows recomputed from rotated queries and keys, for analyses that need whole rows.

The detection decode reads each step's argmax from the model's own attention (`detect.py`); these rows
are the same weights computed from q/k alone, with the architecture layer's per-layer facts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe.architecture import architecture
from probe.models import LoadedModel


@dataclass(frozen=True)
class LayerGeometry:
    """What the model does between q.k and softmax in one layer (read from the HF attention module)."""

    scaling: float
    softcap: float | None
    window: int | None  # sliding window: key k visible from query q iff q - k < window


def attention_geometry(model: LoadedModel) -> list[LayerGeometry]:
    """Per-layer scaling, soft-capping and sliding window, as the bridge's attention uses them
    (from the architecture layer, `probe.architecture`)."""
    arch = architecture(model)
    return [LayerGeometry(a.scaling, a.softcap, a.window)
            for a in (arch.attention(layer) for layer in range(model.n_layers))]


def answer_rows(queries: torch.Tensor, keys: torch.Tensor, first_position: int, geometry: LayerGeometry,
                group_size: int) -> torch.Tensor:
    """Attention weights `[n_heads, T, N]` of T consecutive query rows, from rotated q/k alone.

    `queries` `[T, n_heads, d]` sit at positions first_position .. first_position+T-1; `keys`
    `[N, n_kv, d]` at positions 0..N-1 (N >= first_position + T). Same operations and order as the
    bridge: matmul, x scaling, soft-cap, mask, float32 softmax.
    """
    n_rows, n_keys = queries.shape[0], keys.shape[0]
    q = queries.transpose(0, 1)  # [H, T, d]
    k = keys.transpose(0, 1).repeat_interleave(group_size, dim=0)  # [H, N, d]
    scores = torch.matmul(q, k.transpose(-2, -1)) * geometry.scaling
    if geometry.softcap is not None:
        scores = torch.tanh(scores / geometry.softcap) * geometry.softcap
    rows = torch.arange(first_position, first_position + n_rows, device=scores.device)[:, None]
    cols = torch.arange(n_keys, device=scores.device)[None, :]
    visible = cols <= rows
    if geometry.window is not None:
        visible = visible & (rows - cols < geometry.window)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)

