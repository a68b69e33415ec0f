"""The factual analyzer's contract types: its settings, the demo preset, the result and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from analyses.data.capitals import CAPITALS
from analyses.data.counterfactual import TEMPLATES
from probe.errors import ProbeError
from probe.models import LoadedModel
from probe.results import HeadScores, Provenance, to_jsonable

ANALYZER = "factual"
VERSION = "2"
SCORER = "memorised-first, cut at 'Q:'/newline, case-insensitive whole-word match (analyses.factual.classify_answer)"
LABELS = ("in_context", "memorised", "other")


class FactualError(ProbeError):
    """A factual-recall analysis that cannot be run as configured."""


class SplitOverlapError(FactualError):
    """Held-out prompts ask about a country the heads or factors were chosen on."""


@dataclass(frozen=True)
class FactualConfig:
    """Every knob, with the defaults used in docs/factual.md."""

    template: str = "plain"                 # plain | chat (chat needs a model with a chat template)
    n_tuning: int = 120                     # counterfactual prompts for attribution and the search
    n_heldout: int = 120                    # counterfactual prompts for the report
    tuning_fraction: float = 0.5            # share of countries in the tuning split
    known_only: bool = True                 # keep countries the model answers right without context
    exclude_city_states: bool = True
    table: tuple[tuple[str, str], ...] = ()  # (country, capital) rows; () = analyses.data.capitals
    max_new_tokens: int = 16
    batch_size: int = 32
    candidates_per_direction: int = 3       # top-k heads per sign of attribution enter the scaling search
    factors: tuple[float, ...] = (-5.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
    component: str = "value"                # value | output (identical for a head's direct write)
    generate_curves: bool = False           # also held-out generation at every factor (slow on CPU)
    ablate_top_k: int = 3                   # causal check: size of the ablated head sets
    random_draws: int = 5
    seed: int = 0

    def validate(self, model: LoadedModel) -> None:
        if self.template not in TEMPLATES:
            raise FactualError(f"Unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}.")
        if self.template == "chat" and not model.chat_template:
            raise FactualError(f"{model.spec} has no chat template; use template='plain'.")
        if self.n_tuning < 1 or self.n_heldout < 1:
            raise FactualError("n_tuning and n_heldout must be at least 1 (an empty split measures nothing).")
        if not self.factors:
            raise FactualError("factors is empty: give at least one scale factor.")
        if self.component not in ("value", "output"):
            raise FactualError(f"component must be 'value' or 'output', not {self.component!r}.")
        n_heads = model.n_layers * model.n_heads
        if not 1 <= self.candidates_per_direction <= n_heads:
            raise FactualError(f"candidates_per_direction must be in 1..{n_heads}.")
        if not 1 <= self.ablate_top_k <= n_heads // 2:
            raise FactualError(f"ablate_top_k must be in 1..{n_heads // 2} for {model.spec}.")


# CPU-sized settings for the demo scan (the defaults above are the full run of docs/factual.md).
QUICK = FactualConfig(n_tuning=16, n_heldout=16, max_new_tokens=8, batch_size=16, candidates_per_direction=1,
                      factors=(-2.0, 0.0, 2.0), ablate_top_k=2, random_draws=2,
                      table=tuple((c.country, c.capital) for c in CAPITALS[:60]))


@dataclass
class FactualResult:
    """Attribution scores plus the behaviour, the scaling search and the causal checks."""

    scores: HeadScores                      # mean DLA over the tuning prompts (+ in-context, - memory)
    provenance: Provenance
    data: dict[str, Any]                    # prompt-set notes: template, counts, drops, multi-token
    known: dict[str, Any]                   # no-context accuracy and which countries survive
    baseline: dict[str, Any]                # held-out: generation Rates + FastRates
    top_in_context: list[tuple[str, float]]
    top_memory: list[tuple[str, float]]
    sweep: list[dict[str, Any]]             # tuning split, fast measure, every candidate x factor
    best: dict[str, Any]                    # per direction: head, factor, tuning fast, held-out rates
    curves: dict[str, Any]                  # held-out curves for the chosen heads (fast, generation)
    causal: dict[str, Any]                  # ablation of top heads vs random; best scaling vs random heads
    scorer: str = SCORER
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in self.__dict__.items() if k not in ("scores", "provenance")}
        data["scores"] = self.scores.to_json()
        data["provenance"] = to_jsonable(self.provenance)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FactualResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["provenance"] = Provenance.from_json(data["provenance"])
        fields["top_in_context"] = [tuple(x) for x in data["top_in_context"]]
        fields["top_memory"] = [tuple(x) for x in data["top_memory"]]
        return cls(**fields)
