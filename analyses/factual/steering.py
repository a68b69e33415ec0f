"""Steering by scaling one head: the fast measure at every candidate head and factor, and the best
point towards each answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analyses.common import no_progress
from analyses.data.counterfactual import CounterfactualPrompt
from analyses.factual.behaviour import fast_rates
from analyses.factual.rates import FastRates
from probe.heads import Head
from probe.interventions import scale
from probe.models import LoadedModel


@dataclass
class SweepPoint:
    head: str
    factor: float
    fast: FastRates


def scale_sweep(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], heads: Sequence[Head],
                factors: Sequence[float], component: str = "value", batch_size: int = 32,
                progress: Callable[[float, str], None] = no_progress) -> list[SweepPoint]:
    """Fast measure for every (head, factor): one forward per prompt per point."""
    points = []
    total = max(1, len(heads) * len(factors))
    for i, head in enumerate(heads):
        for j, factor in enumerate(factors):
            progress((i * len(factors) + j) / total, f"scaling {head} x{factor:g}")
            points.append(SweepPoint(str(head), float(factor),
                                     fast_rates(model, prompts, scale([head], component, factor), batch_size)))
    return points


def best_point(points: Sequence[SweepPoint], direction: str) -> SweepPoint:
    """Most in-context (or most memorised) point; ties broken by the mean logit difference."""
    sign = 1.0 if direction == "in_context" else -1.0

    def key(point: SweepPoint) -> tuple[float, float]:
        share = point.fast.prefers_in_context if sign > 0 else 1.0 - point.fast.prefers_in_context
        return share, sign * point.fast.mean_logit_diff

    return max(points, key=key)
