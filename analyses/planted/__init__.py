"""Planted-mechanism models: tiny hand-built models whose weights are set so the right heads are known.

One importable home for the models that prove each analyzer (tests, notebooks, app acceptance tests),
one module per mechanism (retrieval, safety, duo, induction, successor, factual):

| builder | what is planted | known answer |
|---|---|---|
| `retrieval_model()` | a copy-paste head that copies the needle's answer | `RETRIEVAL_HEAD` (L0H2); `RETRIEVAL_DECOY` (L0H3) attends in the needle but never copies |
| `safety_model()` | a refusal head that reads harmful words and writes "sorry" | `SAFETY_HEAD` (L1H2) |
| `duo_model()` | a long-range head and an attention-sink head | `DUO_HEAD` (L0H0) needs the full KV cache; the others are streaming |
| `induction_model()` | a previous-token head feeding an induction head | `INDUCTION_HEADS` = (L0H0, L1H0) |
| `successor_model()` | a head that rotates each ordinal sequence one step | `SUCCESSOR_HEAD` (L1H3) |
| `factual_model()` | an in-context copy head and a memorised-capital head | `FACTUAL_IN_CONTEXT_HEAD` (L1H0), `FACTUAL_MEMORY_HEAD` (L1H1) |

Each builder returns a fresh `LoadedModel` (CPU, float32) built from `transformers` configs and
`probe.tiny.word_tokenizer`, so it works offline and in milliseconds. The retrieval, safety,
successor and factual builders write their weights through `probe.plant` (the architecture layer's
writing side, no Hugging Face module names here) and take `family=` (one of `probe.plant.FAMILIES`:
Llama by default, with the weights and fingerprints these models always had; GPT-NeoX, GPT-2, Qwen3,
Gemma 3) and, except factual, the planted `head=`; tests/families/test_planted_families.py finds each mechanism
on every one of these families.
"""

from analyses.planted.duo import DUO_HEAD, DUO_SINK_HEAD, DUO_WORDS, duo_model, duo_samples
from analyses.planted.factual import IN_CONTEXT_HEAD as FACTUAL_IN_CONTEXT_HEAD
from analyses.planted.factual import MEMORY_HEAD as FACTUAL_MEMORY_HEAD
from analyses.planted.factual import PLANTED_TABLE as FACTUAL_TABLE
from analyses.planted.factual import factual_model
from analyses.planted.induction import INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD, induction_batch, induction_model
from analyses.planted.induction import PLANTED as INDUCTION_HEADS
from analyses.planted.retrieval import (
    RETRIEVAL_DECOY,
    RETRIEVAL_FILLER,
    RETRIEVAL_HEAD,
    RETRIEVAL_NEEDLE,
    RETRIEVAL_TEMPLATE_WORDS,
    retrieval_model,
    retrieval_samples,
    retrieval_sentences,
)
from analyses.planted.safety import (
    SAFETY_HARMFUL_PROMPTS,
    SAFETY_HARMFUL_WORDS,
    SAFETY_HARMLESS_PROMPTS,
    SAFETY_HEAD,
    SAFETY_WORDS,
    safety_model,
)
from analyses.planted.successor import SUCCESSOR_HEAD, successor_model

__all__ = [
    "RETRIEVAL_HEAD", "RETRIEVAL_DECOY", "RETRIEVAL_NEEDLE", "RETRIEVAL_FILLER", "RETRIEVAL_TEMPLATE_WORDS",
    "retrieval_model", "retrieval_sentences", "retrieval_samples",
    "SAFETY_HEAD", "SAFETY_HARMFUL_WORDS", "SAFETY_WORDS", "SAFETY_HARMFUL_PROMPTS", "SAFETY_HARMLESS_PROMPTS",
    "safety_model",
    "DUO_HEAD", "DUO_SINK_HEAD", "DUO_WORDS", "duo_model", "duo_samples",
    "INDUCTION_HEADS", "PREVIOUS_TOKEN_HEAD", "INDUCTION_HEAD", "induction_model", "induction_batch",
    "SUCCESSOR_HEAD", "successor_model",
    "FACTUAL_IN_CONTEXT_HEAD", "FACTUAL_MEMORY_HEAD", "FACTUAL_TABLE", "factual_model",
]
