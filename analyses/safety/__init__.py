"""Safety heads: Ships and Sahara (Zhou et al., ICLR 2025), with a refusal judge and causal validation.

- Ships (query level): KL(p_base || p_ablated) of the next-token distribution at the last prompt
  position, for every query head, with one of the paper's two ablations: undifferentiated
  attention (UA: the head's query scaled by epsilon, done on the attention scores, so it is exact
  per query head under GQA) or scaling contribution (SC: the head's output z scaled by epsilon).
- Generalized Ships (dataset level): the angle between the top left singular vectors (or the sum
  of principal angles of the top-r subspaces) of the stacked final-norm, last-position states of a
  prompt set, base vs ablated. "Final-norm state" = the output of the final RMSNorm including its
  weight (`ln_final.hook_out`, = the HF last hidden state the authors' code reads), not TL's
  `hook_normalized` (before the weight).
- Sahara: greedy group search under the dataset-level score, with the score trace.
- Validation: ASR on held-out harmful prompts and refusal rate on harmless ones, before/after
  ablating the Sahara group of sizes 1..S, against seeded random groups of the same size.

Submodules, in the order a run uses them: judge (the refusal judge), prompts (the text and ids a
model sees), readouts (the two ablations, the clean run, the batched ablated read-outs that start
at the ablated layer), ships, dataset_level (generalized Ships, Sahara), generation (judged answers,
answer perplexity), validation (found vs random groups, the query-level experiment), config,
result, pipeline (`run`), presentation (`summary`, `figures`). The significance tests are in
`analyses.stats`.
"""

from analyses.safety.config import QUICK, SafetyConfig
from analyses.safety.dataset_level import sahara
from analyses.safety.errors import SafetyError
from analyses.safety.generation import generate
from analyses.safety.judge import KeywordJudge
from analyses.safety.pipeline import VERSION, run
from analyses.safety.presentation import figures, summary
from analyses.safety.prompts import encode_prompts
from analyses.safety.readouts import clean_run
from analyses.safety.result import SafetyResult
from analyses.safety.ships import ships_query, ships_query_reference

__all__ = ["SafetyConfig", "SafetyResult", "QUICK", "VERSION", "run", "summary", "figures", "SafetyError",
           "KeywordJudge", "encode_prompts", "ships_query", "ships_query_reference", "sahara", "generate",
           "clean_run"]
