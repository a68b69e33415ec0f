"""Successor heads (Gould, Ong, Ogden, Conmy, ICLR 2024): heads whose OV circuit increments ordinal tokens.

Every head's successor score is read from the weights alone: its effective OV circuit on the
effective embedding e(t) of each task token (block 0's MLP on the embedding) should make t's
successor win among the tokens of t's task (`scores`, checked against the slow reference of
`reference`); a successor head scores above `threshold`.

Beyond the score: an index-mod-10 linear probe on the effective embeddings (leave one task out),
vector arithmetic through the top head (e(t) - d_r + d_j), and a causal check in context
(mean-ablating the top head vs random heads on "Monday, Tuesday, Wednesday," style prompts).

`run(model, SuccessorConfig(...))` returns a `SuccessorResult`; `figures(result)` and `summary(result)`
present it. Submodules: config (settings, preset, result, errors), scores (e(t), the effective OV
circuits, the score), reference (the slow reference), mod10 (the probe), arithmetic, causal,
pipeline (`run`), plots (figures and summary).
"""

from analyses.successor.config import (
    QUICK,
    VERSION,
    SuccessorConfig,
    SuccessorError,
    SuccessorResult,
    UnsupportedArchitectureError,
)
from analyses.successor.pipeline import run
from analyses.successor.plots import figures, summary
from analyses.successor.reference import reference_scores
from analyses.successor.scores import build_circuit, effective_embeddings, ov_logits

__all__ = ["VERSION", "QUICK", "SuccessorConfig", "SuccessorResult", "SuccessorError",
           "UnsupportedArchitectureError", "run", "figures", "summary", "build_circuit", "effective_embeddings",
           "ov_logits", "reference_scores"]
