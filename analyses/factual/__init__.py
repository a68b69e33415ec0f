"""Factual-recall heads (Yu, Merullo, Pavlick, EMNLP 2023): memory heads vs in-context heads.

A counterfactual prompt ("The capital of Poland is London.\\nQ: What is the capital of Poland?\\nA:")
makes the model choose between copying the context city (*in-context*) and recalling the fact
(*memorised*). This package:

1. measures the behaviour: greedy generation (<= 16 tokens) scored by one scorer
   (`classify_answer`, memorised first, answer cut at the next "Q:" or newline), with 95% intervals
   from a cluster bootstrap over countries (prompts about one country are not independent); and a
   fast first-token measure (logit of the in-context first token minus that of the memorised first
   token, and which of the two is larger);
2. attributes that logit difference to every head (direct logit attribution at the last position,
   through the final norm with its scale frozen from the clean run; on Gemma-3 also through the
   post-attention norm, frozen the same way): positive = in-context head, negative = memory head;
3. steers by scaling one head's values (`probe.interventions.scale`, per query head, every position,
   every generation step): candidate heads come from attribution (top-k per direction), the head and
   factor are chosen on a tuning split with the fast measure, and reported on a held-out split of
   other countries (disjointness enforced: `check_disjoint`), with generation;
4. checks attribution causally: zero-ablating the top heads moves the fast measure more than random
   head sets of the same size, and the best scaling beats the same factor on random single heads.

`run(model, FactualConfig(...))` returns a `FactualResult`; `figures(result)` and `summary(result)`
present it. Submodules: config (settings, preset, result, errors), prompts (pool, splits, batches),
rates (the scorer and the rates), behaviour (generation, first-token logits, known capitals),
attribution (DLA and its reference), steering (the scaling search), causal (checks against random
heads), pipeline (`run`), plots (figures and summary). The intervals come from `analyses.stats`.
"""

from analyses.data.counterfactual import CounterfactualPrompt, build_counterfactuals, split_countries
from analyses.factual.attribution import head_attribution, reference_direct_effect
from analyses.factual.behaviour import first_token_logits
from analyses.factual.config import QUICK, VERSION, FactualConfig, FactualError, FactualResult, SplitOverlapError
from analyses.factual.pipeline import run
from analyses.factual.plots import figures, summary
from analyses.factual.rates import classify_answer
from analyses.factual.steering import scale_sweep

__all__ = ["VERSION", "QUICK", "FactualConfig", "FactualResult", "FactualError", "SplitOverlapError", "run",
           "figures", "summary", "classify_answer", "first_token_logits", "head_attribution",
           "reference_direct_effect", "scale_sweep", "CounterfactualPrompt", "build_counterfactuals",
           "split_countries"]
