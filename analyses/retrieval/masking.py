"""The masking experiment: NIAH recall with the top-k heads masked vs k random heads.

Masking (spec §4): NIAH accuracy with the top-k heads masked vs k random heads drawn outside the top list
and outside every head above the retrieval threshold, as uniform attention (the authors' masking) and
as zero-ablation, on the answer rows only (from the last prompt token on, as the authors' decode loop
does). All masking conditions of a prompt share one unmasked prefill and decode together as rows of one
batch (`probe.generation.greedy_steps`, finished rows leaving the batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from analyses.common import Progress, no_progress, random_head_sets
from analyses.data.haystack import NiahSample
from analyses.retrieval.config import MASK_KINDS, RetrievalError
from analyses.retrieval.result import MaskingResult
from analyses.retrieval.scoring import rouge1
from probe import batching
from probe.generation import greedy_steps, growing_cache
from probe.heads import Head
from probe.interventions import Intervention, intervene, uniform_attention, zero_ablation
from probe.models import LoadedModel
from probe.prompting import stop_ids
from probe.results import HeadScores
from probe.routing import on_fused_path


def random_pool_exclusion(scores: HeadScores, top_n: int, threshold: float) -> list[Head]:
    """The heads no random set may contain: the top `top_n` (the masked list) and every head scoring
    above the retrieval threshold, however many (spec pitfall 1: a 'random' set holding retrieval heads
    is no control)."""
    heads = [head for head, _ in scores.top(top_n)] + [head for head, _ in scores.above(threshold)]
    return sorted(set(heads))


def masking_conditions(model: LoadedModel, top: Sequence[Head], ks: Sequence[int], kinds: Sequence[str],
                       draws: int, seed: int, exclude: Sequence[Head] = ()) -> list[dict[str, Any]]:
    """No masking, then per kind and k: the top-k heads and `draws` seeded random k-sets drawn from the
    heads outside the whole top list and outside `exclude` (every head above the threshold, see
    `random_pool_exclusion`), so no random set contains a retrieval head."""
    if max(ks) > len(top):
        raise RetrievalError(f"Cannot mask the top {max(ks)} heads: only {len(top)} are ranked.")
    banned = sorted(set(top) | set(exclude))
    conditions: list[dict[str, Any]] = [{"kind": "", "selection": "none", "k": 0, "draw": 0, "heads": []}]
    for kind in kinds:
        for k in ks:
            conditions.append({"kind": kind, "selection": "top", "k": k, "draw": 0, "heads": list(top[:k])})
            try:
                sets = random_head_sets(model, k, draws, exclude=banned, seed=seed + 1000 * k)
            except ValueError as error:
                raise RetrievalError(f"Random {k}-head sets: {error} ({len(banned)} heads excluded: the top list "
                                     "and every head above the threshold).") from error
            for draw, heads in enumerate(sets):
                conditions.append({"kind": kind, "selection": "random", "k": k, "draw": draw, "heads": heads})
    return conditions


def _condition_intervention(condition: dict[str, Any], start: int, row: int) -> Intervention | None:
    heads = condition["heads"]
    if not heads:
        return None
    where = {"start": start, "rows": (row,)}
    return uniform_attention(heads, **where) if condition["kind"] == "uniform" else zero_ablation(heads, **where)


@contextlib.contextmanager
def _masked_rows(model: LoadedModel, conditions: Sequence[dict[str, Any]], start: int,
                 active: list[int]) -> Iterator[None]:
    """Each batch row's own heads masked, batch row r decoding condition `active[r]`; on the fused path
    (uniform = a zero query, zero = z ablation; positions from the cache length) where exact."""
    interventions = [i for row, slot in enumerate(active)
                     if (i := _condition_intervention(conditions[slot], start, row)) is not None]
    with intervene(model, interventions), on_fused_path(model):
        yield


@torch.no_grad()
def masked_answers(model: LoadedModel, sample: NiahSample, conditions: Sequence[dict[str, Any]],
                   max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy answers under each condition. The prefill of `prompt[:-1]` runs once, unmasked; the
    conditions decode as batch rows from the last prompt token on, each with its own heads masked;
    a finished row leaves the batch, and the masks are rebuilt for the smaller batch."""
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    stops = stop_ids(model, "special_and_newline")
    prefill = growing_cache()  # every position of every layer: masks from the answer on see absolute positions

    with model.lock, on_fused_path(model):  # unmasked prefill on the model's SDPA attention
        model.hf_model(ids[:, :-1], past_key_values=prefill, use_cache=True, logits_to_keep=1)
    def decode(chunk: Sequence[dict[str, Any]]) -> list[str]:  # out-of-memory: batching halves the chunk
        cache = _copy_cache(prefill, len(chunk))
        generated = greedy_steps(model.hf_model, cache, max_new_tokens, stops, model.device,
                                 tokens=ids[:, -1:].repeat(len(chunk), 1), rows=len(chunk), shrink=True,
                                 context=lambda active: _masked_rows(model, chunk, n - 1, active))
        return [model.decode(g) for g in generated]

    size = batching.choose(model, n + max_new_tokens, batch)  # what fits in free memory, <= batch
    return batching.map_batched(decode, list(conditions), size, what="retrieval masking decode")


def _copy_cache(cache: Any, repeats: int) -> Any:
    import copy

    clone = copy.deepcopy(cache)
    clone.batch_repeat_interleave(repeats)
    return clone


def masking_experiment(model: LoadedModel, samples: Sequence[NiahSample], top: Sequence[Head], ks: Sequence[int],
                       kinds: Sequence[str] = MASK_KINDS, draws: int = 3, seed: int = 0, max_new_tokens: int = 24,
                       batch: int = 16, progress: Progress | None = None, exclude: Sequence[Head] = (),
                       stem: bool = True, rouge_threshold: float = 0.5) -> MaskingResult:
    """ROUGE-1 recall of every prompt under no masking, top-k masking and random-k masking (random pool:
    outside `top` and `exclude`). Recall with the other stemming setting is kept too (`recall_other`)."""
    say = progress or no_progress
    started = time.perf_counter()
    conditions = masking_conditions(model, top, ks, kinds, draws, seed, exclude)
    recall: list[list[float]] = [[] for _ in conditions]
    other: list[list[float]] = [[] for _ in conditions]
    responses: list[list[str]] = [[] for _ in conditions]
    for index, sample in enumerate(samples):
        say(index / max(1, len(samples)), f"masking: {sample.label}")
        for slot, answer in enumerate(masked_answers(model, sample, conditions, max_new_tokens, batch)):
            recall[slot].append(rouge1(sample.needle.answer, answer, stem))
            other[slot].append(rouge1(sample.needle.answer, answer, not stem))
            responses[slot].append(answer)
    return MaskingResult(
        conditions=[{**c, "heads": [str(h) for h in c["heads"]]} for c in conditions],
        prompts=[s.summary() for s in samples], recall=recall, responses=responses,
        seconds=time.perf_counter() - started, stemmed=stem, recall_other=other,
        excluded=[str(h) for h in sorted(set(top) | set(exclude))], rouge_threshold=rouge_threshold)

