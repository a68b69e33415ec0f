"""Evaluation: needle-in-a-haystack recall with chosen heads streaming, and the gates' agreement with
the training-free profiling baseline and with cached retrieval-head scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analyses.common import Progress, no_progress
from analyses.data.haystack import rouge1_recall
from analyses.duo.config import DuoConfig
from analyses.duo.passkeys import PasskeySample
from probe.architecture import architecture
from probe.generation import decode_variants
from probe.heads import Head
from probe.interventions import intervene, streaming_attention, streaming_mask
from probe.models import LoadedModel
from probe.results import HeadScores, ResultCache



def _answer_recall(model: LoadedModel, sample: Any, new_ids: torch.Tensor | Sequence[int]) -> float:
    answer = model.decode(new_ids)
    return rouge1_recall(sample.needle.answer, answer.split("\n")[0] if answer.strip() else answer)


@torch.no_grad()
def niah_accuracy(model: LoadedModel, samples: Sequence[Any], heads: Sequence[Head], config: DuoConfig) -> list[float]:
    """ROUGE-1 recall of each sample's greedy answer with `heads` restricted to sink + recent."""
    scores = []
    for sample in samples:
        ids = sample.ids(model.device)
        start = ids.shape[1] if config.regime == "decode-only" else 0
        interventions = [streaming_attention(heads, config.sink, config.recent, start=start)] if heads else []
        with intervene(model, interventions):
            scores.append(_answer_recall(model, sample, model.generate(ids, max_new_tokens=config.max_new_tokens)))
    return scores


@torch.no_grad()
def niah_runs(model: LoadedModel, samples: Sequence[Any], head_sets: Sequence[Sequence[Head]], config: DuoConfig,
              progress: Progress = no_progress) -> list[list[float]]:
    """`niah_accuracy` for each streaming head set (`[]`: full attention), per set a score per sample.

    Decode-only regime: the prompt is the same under every set (streaming starts after it), so each sample
    is prefilled once and every set decodes from that cache in one batch (`probe.generation.decode_variants`);
    each set's answers equal its own `niah_accuracy` up to batched float rounding. All-positions: one set
    at a time."""
    if config.regime != "decode-only":
        return [niah_accuracy(model, samples, heads, config) for heads in head_sets]
    runs: list[list[float]] = [[] for _ in head_sets]
    for index, sample in enumerate(samples):
        progress(index / max(1, len(samples)), f"NIAH sample {index + 1}/{len(samples)}, {len(head_sets)} head sets")
        ids = sample.ids(model.device)
        variants = [[streaming_attention(heads, config.sink, config.recent, start=ids.shape[1])] if heads else []
                    for heads in head_sets]
        for run, new in zip(runs, decode_variants(model, ids, variants, config.max_new_tokens)):
            run.append(_answer_recall(model, sample, new))
    return runs


def profiling_scores(model: LoadedModel, sample: PasskeySample, sink: int, recent: int) -> torch.Tensor:
    """The training-free baseline (mlx-lm PR #1522 idea): attention mass outside sink ∪ recent, per KV
    head (mean over its query heads and the QA positions)."""
    names = {f"blocks.{l}.attn.hook_pattern" for l in range(model.n_layers)}
    with torch.no_grad():
        _, cache = model.run_with_cache(sample.ids, names_filter=lambda n: n in names)  # holds model.lock
    out = torch.zeros(model.n_layers, model.n_kv_heads)
    k_len = sample.ids.shape[1]
    keep = streaming_mask(sample.loss_positions, k_len, sink, recent)
    for l in range(model.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0][:, sample.loss_positions]  # [H, n, k]
        outside = (pattern * (~keep).to(pattern.device, pattern.dtype)).sum(-1).mean(-1)  # [H], on the layer's device
        kv_index = architecture(model).kv_index.to(outside.device)
        groups = torch.zeros(model.n_kv_heads, dtype=outside.dtype, device=outside.device).index_add_(0, kv_index, outside)
        out[l] = (groups / torch.bincount(kv_index, minlength=model.n_kv_heads).to(groups)).cpu()
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # average ties
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def group_max(model: LoadedModel, scores: torch.Tensor) -> torch.Tensor:
    """Query-head scores `[L, H]` → per KV group `[L, n_kv]` (max over the group's query heads)."""
    scores = torch.nan_to_num(scores.double(), nan=0.0)
    kv_index = architecture(model).kv_index
    return torch.stack([scores[:, kv_index == g].max(-1).values for g in range(model.n_kv_heads)], dim=1)


def retrieval_agreement(model: LoadedModel, gates: torch.Tensor) -> dict[str, Any] | None:
    """Rank correlation with the newest cached retrieval-heads result for this model, if any."""
    for entry in ResultCache().entries(model.fingerprint):
        if entry["provenance"]["analyzer"] == "retrieval":
            scores = HeadScores.from_json(entry["result"]["scores"])
            return {"spearman": spearman(gates, group_max(model, scores.scores)),
                    "retrieval_key": entry["provenance"]["data_hash"]}
    return None
