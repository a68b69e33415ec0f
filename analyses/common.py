"""What every analyzer shares: the progress callback type, provenance, seeded random head sets.

An analyzer module looks like this (the faces rely on it):

    @dataclass(frozen=True)
    class XConfig: ...                      # every knob with a default; doubles as CLI/YAML options
    @dataclass
    class XResult:                          # head scores + the method's own evidence
        scores: HeadScores; provenance: Provenance; ...
        def to_json(self) -> dict; @classmethod def from_json(cls, d) -> XResult
    def run(model, config, progress=None) -> XResult    # pure: no Streamlit, no printing
    def figures(result) -> dict[str, plotly Figure]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from probe.heads import Head
from probe.loaded import LoadedModel
from probe.progress import Progress, no_progress
from probe.results import Provenance, stable_hash

__all__ = ["Progress", "no_progress", "provenance", "random_head_sets"]


def provenance(model: LoadedModel, analyzer: str, version: str, config: Any, data: Any, seed: int) -> Provenance:
    """Provenance of one analyzer run; `data` is anything JSON-able that identifies the inputs."""
    config_dict = asdict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    return Provenance(model_spec=model.spec, model_fingerprint=model.fingerprint, analyzer=analyzer,
                      analyzer_version=version, config=config_dict, data_hash=stable_hash(data), seed=seed)


def random_head_sets(model: LoadedModel, size: int, draws: int, exclude: Sequence[Head], seed: int) -> list[list[Head]]:
    """`draws` seeded random sets of `size` heads from the model's real shape, never touching `exclude`.

    (The retrieval-heads authors' code compared tuples with lists, so its 'random' heads could
    include the heads under test; here the pool is the complement of `exclude`.)
    """
    excluded = set(exclude)
    pool = [h for h in model.all_heads() if h not in excluded]
    if size > len(pool):
        raise ValueError(f"Cannot draw {size} heads from {len(pool)} heads outside the excluded set.")
    rng = random.Random(seed)
    return [sorted(rng.sample(pool, size)) for _ in range(draws)]
