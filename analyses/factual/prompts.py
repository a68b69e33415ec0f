"""The prompt sets of a run: the country pool, the tuning / held-out disjointness check, and batches
of equal token length."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analyses.data.capitals import Capital
from analyses.data.counterfactual import CounterfactualPrompt, default_pool
from analyses.factual.config import FactualConfig, FactualError, SplitOverlapError
from probe import batching
from probe.models import LoadedModel


def check_disjoint(tuning: Sequence[CounterfactualPrompt], heldout: Sequence[CounterfactualPrompt]) -> None:
    """Held-out prompts must ask about countries the tuning prompts never asked about: the heads and
    the factors are chosen on the tuning facts, so a shared country would test them on what they fit."""
    shared = sorted({p.country for p in tuning} & {p.country for p in heldout})
    if shared:
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise SplitOverlapError(f"The held-out prompts ask about {len(shared)} tuning "
                                f"{'country' if len(shared) == 1 else 'countries'} ({shown}); the held-out "
                                "causal test needs countries disjoint from the tuning ones (split_countries).")


def _pool(config: FactualConfig) -> list[Capital]:
    if not config.table:
        return default_pool(config.exclude_city_states)
    return [Capital(country, capital) for country, capital in config.table]


def _groups(prompts: Sequence[CounterfactualPrompt], model: LoadedModel,
            batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """Batches of equal token length (no padding, so every row is computed exactly as alone)."""
    if not prompts:
        raise FactualError("No prompts to run (empty split).")
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, prompt in enumerate(prompts):
        ids = model.encode(prompt.text)
        model.check_fits(ids.shape[-1])
        by_length.setdefault(ids.shape[-1], []).append((index, ids[0]))
    batches = []
    for length, rows in sorted(by_length.items()):
        size = batching.choose(model, length, batch_size)  # what fits in the device's free memory, <= batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batches.append(([i for i, _ in chunk], torch.stack([ids for _, ids in chunk])))
    return batches
