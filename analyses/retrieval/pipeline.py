"""The run: detection over the NIAH grid, the ROUGE gate, the scores, then the masking experiment."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from analyses.common import Progress, no_progress, provenance
from analyses.data.haystack import NiahSample
from analyses.data.needles import NEEDLES, Needle
from analyses.retrieval.config import (
    ANALYZER,
    QUICK,
    SCORE_MODES,
    VERSION,
    NoRetrievalError,
    RetrievalConfig,
    RetrievalError,
    resolve_template,
)
from analyses.retrieval.detect import fast_sample
from analyses.retrieval.masking import masking_experiment, random_pool_exclusion
from analyses.retrieval.result import RetrievalResult
from analyses.retrieval.scoring import SampleTrace, rouge1
from analyses.retrieval.splits import build_samples, check_context, check_split
from probe.models import LoadedModel
from probe.parallel import map_items
from probe.results import HeadScores
from probe.runtime import large_blocks_mapped


def _trace_sample(model: LoadedModel, item: tuple[NiahSample, int, str]) -> SampleTrace:
    """One detection sample (a shard item of `probe.parallel.map_items`: samples are independent)."""
    sample, max_new_tokens, match = item
    return fast_sample(model, sample, max_new_tokens, match)


def _mean(tensors: list[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    if not tensors:
        return torch.full(shape, float("nan"), dtype=torch.float64)
    return torch.stack(tensors).mean(0)


def run(model: LoadedModel, config: RetrievalConfig = QUICK, progress: Progress | None = None,
        needle_set: Sequence[Needle] = NEEDLES, sentences: Sequence[str] | None = None) -> RetrievalResult:
    """Detect retrieval heads over the config's NIAH grid; then the masking experiment if asked.

    `needle_set` / `sentences` replace the project's needles / the Shakespeare haystack (planted tests).

    Raises `PromptTooLongError` for contexts beyond the window, `NoRetrievalError` (with the ungated
    result attached) when the gate keeps no sample, `RetrievalError` when no needle could be located.
    """
    config.validate()
    say = progress or no_progress
    started = time.perf_counter()
    template = resolve_template(model, config.template)
    check_context(model, config.lengths, config.max_new_tokens)
    say(0.0, "building the needle-in-a-haystack prompts")
    grid, records = build_samples(model, config.needles, config.lengths, config.depths, template, needle_set,
                                  sentences, config.haystack_stride)
    if not grid.samples:
        raise RetrievalError(f"No needle could be located in any prompt: {grid.skipped[:3]}")
    mask_grid, split = None, None
    if config.mask_ks:  # built and checked before any scoring: an in-sample split fails in seconds, not hours
        mask_lengths = config.mask_lengths or config.lengths
        check_context(model, mask_lengths, config.max_new_tokens)
        mask_grid, mask_records = build_samples(model, config.mask_needles, mask_lengths, config.masking_depths(),
                                                template, needle_set, sentences, config.haystack_stride,
                                                config.masking_offset())
        if not mask_grid.samples:
            raise RetrievalError(f"No needle could be located in any masking prompt: {mask_grid.skipped[:3]}")
        split = check_split(records, mask_records, config.allow_in_sample)
    shape = (model.n_layers, model.n_heads)
    samples: list[dict[str, Any]] = []
    per_events: list[torch.Tensor] = []
    per_unique: list[torch.Tensor] = []
    detect_share = 0.6 if config.mask_ks else 1.0
    with large_blocks_mapped():  # prompts of many lengths: the heap kept their activations resident (runtime)
        traces = map_items(model, _trace_sample, [(s, config.max_new_tokens, config.match) for s in grid.samples],
                           lambda done, total: say(detect_share * done / total, f"scoring sample {done + 1} of {total}"
                                                   if done < total else f"scored {total} samples"))  # probe.parallel
    for sample, record, trace in zip(grid.samples, records, traces):
        span = sample.answer_tokens[1] - sample.answer_tokens[0]
        stemmed = rouge1(sample.needle.answer, trace.response, stem=True)
        unstemmed = rouge1(sample.needle.answer, trace.response, stem=False)
        recall = stemmed if config.rouge_stem else unstemmed
        retained = (recall > config.rouge_threshold) or not config.rouge_gate
        per_events.append(trace.events.to(torch.float64) / span)
        per_unique.append(trace.unique.to(torch.float64) / span)
        samples.append({**sample.summary(), "response": trace.response, "answer_len": len(trace.answer_ids),
                        "rouge1_recall": recall, "rouge1_recall_stemmed": stemmed,
                        "rouge1_recall_unstemmed": unstemmed, "success": recall > config.rouge_threshold,
                        "retained": retained, "needle_distance": sample.prompt_len - sample.answer_tokens[1],
                        "haystack_offset": record["haystack_offset"],
                        "haystack_sentences": record["haystack_sentences"]})
    kept = [i for i, s in enumerate(samples) if s["retained"]]
    per_sample = {"events": torch.stack(per_events), "unique": torch.stack(per_unique)}
    prov = provenance(model, ANALYZER, VERSION, config,
                      {"samples": [s for s in (x.summary() for x in grid.samples)], "template": template},
                      config.seed)
    variants: dict[str, HeadScores] = {}
    for mode in SCORE_MODES:
        units = "copy events / answer tokens" if mode == "events" else "distinct answer tokens copied / answer tokens"
        variants[mode] = HeadScores(f"retrieval score ({mode})", units,
                                    _mean([per_sample[mode][i] for i in kept], shape), prov,
                                    f"mean over {len(kept)} retained of {len(grid.samples)} scored samples")
        variants[f"{mode}_ungated"] = HeadScores(f"retrieval score ({mode}, ungated)", units,
                                                 per_sample[mode].mean(0), prov,
                                                 f"mean over all {len(grid.samples)} scored samples")
    result = RetrievalResult(
        scores=variants[config.score_mode], variants=variants, per_sample=per_sample, samples=samples,
        skipped=grid.skipped, config=asdict(config), template=template, group_size=model.group_size,
        n_kv_heads=model.n_kv_heads, provenance=prov, split=split,
    )
    if not kept:
        result.scores = variants[f"{config.score_mode}_ungated"]
        raise NoRetrievalError(
            f"No sample passed the ROUGE-1 recall gate (> {config.rouge_threshold}) on {model.spec}: "
            f"0 of {len(grid.samples)} retrieved the answer, so there are no gated scores. "
            "Try shorter contexts, the other prompt template, or rouge_gate=False for diagnosis "
            "(the ungated result is attached to this error as `.result`).", result)
    if config.mask_ks and mask_grid is not None:
        top = [head for head, _ in result.scores.top(max(config.mask_ks))]
        exclude = random_pool_exclusion(result.scores, max(config.mask_ks), config.threshold)
        with large_blocks_mapped():
            result.masking = masking_experiment(
                model, mask_grid.samples, top, config.mask_ks, config.mask_kinds, config.mask_random_draws,
                config.seed, config.max_new_tokens, config.mask_batch,
                lambda f, m: say(detect_share + (1 - detect_share) * f, m), exclude=exclude,
                stem=config.rouge_stem, rouge_threshold=config.rouge_threshold)
        result.masking.skipped = mask_grid.skipped
    result.seconds = time.perf_counter() - started
    say(1.0, "done")
    return result

