"""Attribution checked by intervention on held-out countries: ablating the top heads and the chosen
scaling against random heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from analyses.common import random_head_sets
from analyses.data.counterfactual import CounterfactualPrompt
from analyses.factual.behaviour import fast_rates
from analyses.factual.config import FactualConfig
from analyses.factual.prompts import check_disjoint
from analyses.factual.rates import FastRates
from probe.heads import Head
from probe.interventions import Intervention, scale, zero_ablation
from probe.models import LoadedModel


def _random_effects(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], sets: Sequence[Sequence[Head]],
                    make: Callable[[Sequence[Head]], Intervention], batch_size: int) -> list[FastRates]:
    return [fast_rates(model, prompts, make(heads), batch_size) for heads in sets]


def causal_checks(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], top_ic_heads: Sequence[Head],
                  top_mem_heads: Sequence[Head], best: dict[str, Any], config: FactualConfig,
                  baseline: FastRates, tuning: Sequence[CounterfactualPrompt]) -> dict[str, Any]:
    """Attribution checked by intervention, on held-out prompts, with the fast measure.

    `tuning` are the prompts the heads and factors were chosen on: `prompts` must ask about other
    countries (`check_disjoint`, a `SplitOverlapError` otherwise).

    - Zero-ablating the top in-context heads should lower d (mean logit difference) more than ablating
      random sets of the same size; zero-ablating the top memory heads should raise it more.
    - The chosen scaling should move d more than the same factor on random single heads.
    Random sets exclude every head under test (`random_head_sets`).
    """
    check_disjoint(tuning, prompts)
    out: dict[str, Any] = {"measure": "change in mean logit(in-context) - logit(memorised) vs baseline",
                           "baseline_mean_logit_diff": baseline.mean_logit_diff,
                           "n_tuning_countries": len({p.country for p in tuning}),
                           "n_heldout_countries": len({p.country for p in prompts})}
    exclude = list(dict.fromkeys(list(top_ic_heads) + list(top_mem_heads)))
    for name, heads, sign in (("ablate_in_context_heads", top_ic_heads, -1.0),
                              ("ablate_memory_heads", top_mem_heads, 1.0)):
        found = fast_rates(model, prompts, zero_ablation(list(heads)), config.batch_size)
        sets = random_head_sets(model, len(heads), config.random_draws, exclude, config.seed + 7)
        randoms = _random_effects(model, prompts, sets, lambda hs: zero_ablation(list(hs)), config.batch_size)
        found_shift = found.mean_logit_diff - baseline.mean_logit_diff
        random_shifts = [r.mean_logit_diff - baseline.mean_logit_diff for r in randoms]
        out[name] = {"heads": [str(h) for h in heads], "expected_sign": sign, "shift": found_shift,
                     "fast": found.to_json(), "random_sets": [[str(h) for h in s] for s in sets],
                     "random_shifts": random_shifts,
                     "beats_all_random": all(sign * found_shift > sign * r for r in random_shifts)}
    for direction, sign in (("in_context", 1.0), ("memorised", -1.0)):
        choice = best[direction]
        head = Head.parse(choice["head"])
        sets = random_head_sets(model, 1, config.random_draws, exclude + [head], config.seed + 11)
        randoms = _random_effects(model, prompts, sets,
                                  lambda hs: scale(list(hs), config.component, choice["factor"]), config.batch_size)
        shift = choice["heldout_fast"]["mean_logit_diff"] - baseline.mean_logit_diff
        random_shifts = [r.mean_logit_diff - baseline.mean_logit_diff for r in randoms]
        out[f"scale_{direction}"] = {"head": choice["head"], "factor": choice["factor"], "expected_sign": sign,
                                     "shift": shift, "random_heads": [str(s[0]) for s in sets],
                                     "random_shifts": random_shifts,
                                     "beats_all_random": all(sign * shift > sign * r for r in random_shifts)}
    return out
