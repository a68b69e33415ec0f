"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574): heads that copy the needle while the answer is written.

A copy event of query head (l, h) at answer step t: the head's argmax attention key j* lies inside the
needle's answer span [s, e) and the prompt token there is the token being generated (`P[j*] == w_t`).
Scores per head (spec §2), both computed on every run:

- `events` (authors' code): events over all answer steps / |answer span|; can exceed 1;
- `unique` (paper): distinct answer-span positions copied / |answer span|; at most 1.

Samples count only when the model actually retrieved the answer (ROUGE-1 recall of the answer phrase in
the response > 0.5, switchable), computed as the authors' code does, by `rouge_score` with Porter stemming
(`rouge_stem=False`: plain words; both recalls are kept per sample and `stem_changes()` counts the
verdicts stemming moves); ungated scores are kept for diagnosis (spec pitfall 11).

`run(model, RetrievalConfig(...))` builds the NIAH grids (`splits.py`: detection, and the held-out masking
grid), decodes every detection sample on the fast path (`detect.py`: one cached greedy decode through
`probe.generation.greedy_steps`, each step's argmax key per head from the model's own attention row;
`reference_sample` is the slow no-cache oracle), scores copy events behind the ROUGE gate (`scoring.py`),
then runs the masking experiment (`masking.py`: top-k vs random-k heads masked, all conditions of a prompt
decoded from one shared prefill as the rows of one shrinking batch). Submodules: config (settings,
presets, errors), scoring, geometry (attention rows recomputed from rotated q/k, for analyses that need
whole rows), detect, splits, masking, result (result classes and the text summary), pipeline (`run`),
plots (`figures`).
"""

from analyses.retrieval.config import (
    DEFAULT,
    QUICK,
    VERSION,
    InSampleError,
    NoRetrievalError,
    RetrievalConfig,
    RetrievalError,
)
from analyses.retrieval.detect import fast_sample, reference_sample
from analyses.retrieval.geometry import answer_rows, attention_geometry
from analyses.retrieval.masking import masked_answers, masking_conditions, masking_experiment, random_pool_exclusion
from analyses.retrieval.pipeline import run
from analyses.retrieval.plots import figures
from analyses.retrieval.result import MaskingResult, RetrievalResult, summary, summary_text
from analyses.retrieval.scoring import rouge1
from analyses.retrieval.splits import build_samples, check_split, split_overlap

__all__ = [
    "RetrievalConfig", "RetrievalResult", "MaskingResult", "RetrievalError", "NoRetrievalError", "InSampleError",
    "QUICK", "DEFAULT", "VERSION", "run", "figures", "summary", "summary_text", "fast_sample", "reference_sample",
    "answer_rows", "attention_geometry", "masking_experiment", "masked_answers", "masking_conditions",
    "random_pool_exclusion", "check_split", "split_overlap", "build_samples", "rouge1",
]
