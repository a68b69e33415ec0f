"""The NIAH grids of the two phases, and how the masking grid is held out from the detection grid.

Held out by default, as in the paper (heads selected on some needles, masking measured on another needle
and haystack): detection on needles 0-2, masking on needles 3-5, at the midpoints between the detection
depths, on haystack stretches shifted by half the needle stride. `check_split` records what each phase
used; a shared needle, depth or haystack sentence is an `InSampleError` unless `allow_in_sample=True`
(then labelled in-sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyses.data.haystack import (
    NEEDLE_STRIDE,
    NeedleNotFoundError,
    NiahGrid,
    NiahSample,
    build_sample,
    haystack_sentences,
)
from analyses.data.needles import NEEDLES, Needle
from analyses.retrieval.config import InSampleError, RetrievalError
from probe.errors import PromptTooLongError
from probe.models import LoadedModel


def check_context(model: LoadedModel, lengths: Sequence[int], max_new_tokens: int, margin: int = 64) -> None:
    """Refuse, before any work, contexts that cannot fit in the model's window with the question."""
    too_long = [n for n in lengths if n + margin + max_new_tokens > model.n_ctx]
    if too_long:
        raise PromptTooLongError(
            f"Context lengths {too_long} do not fit {model.spec}'s window of {model.n_ctx} tokens "
            f"(plus ~{margin} tokens of question/template and {max_new_tokens} answer tokens); "
            f"use lengths <= {model.n_ctx - margin - max_new_tokens}.")


def build_samples(model: LoadedModel, needles: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                  template: str, needle_set: Sequence[Needle] = NEEDLES,
                  sentences: Sequence[str] | None = None, stride: int = NEEDLE_STRIDE,
                  shift: int = 0) -> tuple[NiahGrid, list[dict[str, Any]]]:
    """The NIAH grid in this model's tokens (needle x length x depth); every prompt must fit the window.

    Needle i reads the haystack from sentence `(i * stride + shift) mod len(haystack)` (detection: shift 0,
    as `haystack.build_grid`; masking: another shift, so the two phases read different text). Returns the
    grid and, per sample, where it came from: needle, length, depth, haystack offset and the range of
    haystack sentences `[start, stop)` the prompt holds (recorded in the result, checked for overlap)."""
    pool = haystack_sentences() if sentences is None else sentences
    bad = [i for i in needles if not 0 <= i < len(needle_set)]
    if bad:
        raise RetrievalError(f"Needle indices {bad} do not exist; there are {len(needle_set)} needles "
                             f"(0-{len(needle_set) - 1}).")
    grid, records = NiahGrid(samples=[]), []
    for needle_index in needles:
        offset = (needle_index * stride + shift) % max(1, len(pool))
        for length in lengths:
            for depth in depths:
                try:
                    sample = build_sample(model.tokenizer, needle_set[needle_index], int(length), float(depth),
                                          template, pool, offset, needle_index)
                except NeedleNotFoundError as error:
                    grid.skipped.append({"needle_index": needle_index, "context_length": int(length),
                                         "depth": float(depth), "haystack_offset": offset, "reason": str(error)})
                    continue
                model.check_fits(sample.prompt_len)
                grid.samples.append(sample)
                records.append({"needle_index": needle_index, "context_length": int(length), "depth": float(depth),
                                "haystack_offset": offset, "haystack_sentences": _haystack_span(sample, pool, offset)})
    return grid, records


def _haystack_span(sample: NiahSample, pool: Sequence[str], offset: int) -> list[int]:
    """`[start, stop)`: the consecutive haystack sentences from `offset` on that the prompt contains
    (`build_sample` takes whole sentences in order from its offset; a later sentence that happened to
    be a substring of the prompt would only widen the range, which errs towards reporting overlap)."""
    stop = offset
    while stop < len(pool) and pool[stop] in sample.prompt:
        stop += 1
    return [offset, stop]


def split_overlap(detection: Sequence[dict[str, Any]], masking: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the masking grid shares with the detection grid: needles, depths, haystack sentences."""
    used = set()
    for record in detection:
        used.update(range(*record["haystack_sentences"]))
    shared = set()
    for record in masking:
        shared.update(i for i in range(*record["haystack_sentences"]) if i in used)
    return {
        "needles": sorted({r["needle_index"] for r in masking} & {r["needle_index"] for r in detection}),
        "depths": sorted({r["depth"] for r in masking} & {r["depth"] for r in detection}),
        "haystack_sentences": len(shared),
    }


def _phase(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One phase's grid as recorded in the result: needles, lengths, depths, haystack offsets and ranges."""
    ranges: dict[int, list[int]] = {}
    for r in records:
        start, stop = r["haystack_sentences"]
        old = ranges.get(r["needle_index"], [start, stop])
        ranges[r["needle_index"]] = [min(old[0], start), max(old[1], stop)]
    return {
        "needles": sorted({r["needle_index"] for r in records}),
        "lengths": sorted({r["context_length"] for r in records}),
        "depths": sorted({r["depth"] for r in records}),
        "haystack_offsets": {str(n): r["haystack_offset"] for n, r in
                             sorted({r["needle_index"]: r for r in records}.items())},
        "haystack_sentences": {str(n): span for n, span in sorted(ranges.items())},
        "samples": len(records),
    }


def check_split(detection: Sequence[dict[str, Any]], masking: Sequence[dict[str, Any]],
                allow_in_sample: bool) -> dict[str, Any]:
    """The split record of a run; raises `InSampleError` when masking is not held out from detection
    (shared needle, depth or haystack sentence) unless `allow_in_sample`, and then labels it in-sample."""
    overlap = split_overlap(detection, masking)
    in_sample = bool(overlap["needles"] or overlap["depths"] or overlap["haystack_sentences"])
    if in_sample and not allow_in_sample:
        raise InSampleError(
            f"The masking grid is not held out from detection: shared needles {overlap['needles']}, depths "
            f"{overlap['depths']}, {overlap['haystack_sentences']} haystack sentences. Choose other mask_needles / "
            "mask_depths / mask_offset, or set allow_in_sample=True to measure in-sample (labelled in the result).")
    return {"detection": _phase(detection), "masking": _phase(masking), "overlap": overlap,
            "in_sample": in_sample, "allow_in_sample": allow_in_sample}

