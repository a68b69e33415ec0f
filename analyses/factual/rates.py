"""The behavioural measures: one answer scorer, generation rates with their intervals, and the
first-token rates."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from analyses.factual.config import LABELS, FactualError
from analyses.stats import cluster_bootstrap_interval, wilson_interval


def cut_answer(text: str) -> str:
    """The answer proper: leading space dropped, cut at the next 'Q:' or newline."""
    text = text.lstrip()
    for stop in ("Q:", "\n"):
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    return text.strip()


def _mentions(answer: str, name: str) -> bool:
    """Whole-word, case-insensitive: 'Rome' must not match 'Romeo', 'Niger' not 'Nigeria'."""
    return re.search(r"(?<!\w)" + re.escape(name.casefold()) + r"(?!\w)", answer.casefold()) is not None


def classify_answer(generated: str, capital_names: Sequence[str], context_city: str) -> str:
    """'memorised' if any name of the true capital occurs (it takes precedence, as in the paper's
    check_answers.py), else 'in_context' if the context city occurs, else 'other'."""
    answer = cut_answer(generated)
    if any(_mentions(answer, name) for name in capital_names):
        return "memorised"
    if context_city and _mentions(answer, context_city):
        return "in_context"
    return "other"


@dataclass
class Rates:
    """Generation rates over a prompt set: counts, rates and 95% intervals per label.

    With `clusters` (each prompt's country; at least two distinct), intervals are a cluster bootstrap
    over countries (`cluster_bootstrap_interval`); otherwise (one prompt per country, or no clusters)
    Wilson intervals over prompts."""

    n: int
    counts: dict[str, int]
    examples: list[str] = field(default_factory=list)  # a few cut answers, for the report
    labels: list[str] = field(default_factory=list)     # per prompt (with clusters: for the bootstrap)
    clusters: list[str] = field(default_factory=list)   # per prompt: its country
    seed: int = 0

    def rate(self, label: str) -> float:
        return self.counts[label] / self.n

    @property
    def interval_method(self) -> str:
        clustered = len(self.labels) == self.n and len(set(self.clusters)) >= 2 and len(self.clusters) > len(set(self.clusters))
        return "cluster bootstrap over countries" if clustered else "Wilson"

    def interval(self, label: str) -> tuple[float, float]:
        if self.interval_method == "Wilson":
            return wilson_interval(self.counts[label], self.n)
        return cluster_bootstrap_interval([float(x == label) for x in self.labels], self.clusters, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "counts": dict(self.counts), "examples": list(self.examples),
                "rates": {k: self.rate(k) for k in LABELS},
                "intervals": {k: list(self.interval(k)) for k in LABELS},
                "interval_method": self.interval_method, "n_clusters": len(set(self.clusters)),
                "labels": list(self.labels), "clusters": list(self.clusters), "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rates:
        return cls(int(data["n"]), {k: int(v) for k, v in data["counts"].items()}, list(data.get("examples", [])),
                   list(data.get("labels", [])), list(data.get("clusters", [])), int(data.get("seed", 0)))


def rates_from_labels(labels: Sequence[str], answers: Sequence[str] = (), clusters: Sequence[str] = (),
                      seed: int = 0) -> Rates:
    if not labels:
        raise FactualError("No prompts to measure (empty split).")
    if clusters and len(clusters) != len(labels):
        raise FactualError(f"{len(labels)} labels but {len(clusters)} cluster names.")
    return Rates(len(labels), {k: sum(label == k for label in labels) for k in LABELS},
                 [cut_answer(a) for a in answers[:5]], list(labels), list(clusters), seed)


@dataclass
class FastRates:
    """First-token measure: d = logit(in-context first token) - logit(memorised first token).

    `prefers_in_context` = share with d > 0 (the two-way choice); `argmax_*` = share whose
    next-token argmax over the whole vocabulary is that answer's first token.
    """

    n: int
    mean_logit_diff: float
    prefers_in_context: float
    argmax_in_context: float
    argmax_memorised: float
    intervals: dict[str, list[float]] = field(default_factory=dict)  # cluster bootstrap over countries

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FastRates:
        return cls(**data)
