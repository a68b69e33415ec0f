"""Deployment: the learned gates made binary (retrieval vs streaming KV heads) and what that saves."""

from __future__ import annotations

import torch

from probe.architecture import architecture
from probe.heads import Head
from probe.models import LoadedModel



def binarise(gates: torch.Tensor, retrieval_fraction: float, seed: int = 0) -> torch.Tensor:
    """True = retrieval KV head: gates at or above the global quantile that keeps `retrieval_fraction`.

    Ties are broken by a tiny seeded noise, as the authors' code does, so the ratio is met exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    noisy = gates.double() + 1e-9 * torch.rand(gates.shape, generator=generator, dtype=torch.float64)
    n_keep = max(1, round(retrieval_fraction * gates.numel()))
    threshold = noisy.flatten().sort(descending=True).values[n_keep - 1]
    return noisy >= threshold


def streaming_heads(model: LoadedModel, retrieval: torch.Tensor) -> list[Head]:
    """All query heads of the KV heads that are not retrieval heads (the architecture layer's GQA map)."""
    arch = architecture(model)
    return [Head(l, q) for l in range(model.n_layers) for g in range(model.n_kv_heads) if not retrieval[l, g]
            for q in range(model.n_heads) if arch.kv_of(q) == g]


def kv_cache_bytes(model: LoadedModel, retrieval: torch.Tensor, context: int, sink: int, recent: int) -> dict[str, float]:
    """KV-cache size for one sequence of `context` tokens: full vs retrieval heads full + streaming sink+recent."""
    per_head_token = 2 * model.d_head * torch.finfo(model.dtype).bits // 8  # keys and values
    total_heads = retrieval.numel()
    n_retrieval = int(retrieval.sum())
    full = total_heads * context * per_head_token
    duo = (n_retrieval * context + (total_heads - n_retrieval) * min(context, sink + recent)) * per_head_token
    return {"context": context, "full_bytes": full, "duo_bytes": duo, "saving": 1 - duo / full,
            "ratio": full / duo}
