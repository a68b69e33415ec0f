"""What a safety run returns, and its JSON round-trip."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from analyses.safety.dataset_level import SaharaStep
from analyses.safety.validation import ConditionResult
from probe.heads import Head
from probe.results import HeadScores, Provenance


@dataclass
class SafetyResult:
    """Ships heat map, the Sahara group and trace, validation numbers and example generations.

    `scores` (the query-level Ships map) is what the atlas and the reports rank heads by.
    """

    ships: HeadScores  # mean query-level Ships over the Ships prompts (KL, nats)
    generalized: HeadScores  # dataset-level score of each single head (Sahara step 1 pool; NaN outside)
    sahara_steps: list[SaharaStep]
    validation: list[ConditionResult]
    summary: dict[str, Any]
    examples: dict[str, list[dict[str, Any]]]
    rendered_prompt_example: str
    per_prompt_top: list[dict[str, Any]]
    timings: dict[str, float]
    provenance: Provenance
    query_level: dict[str, Any] = field(default_factory=dict)  # the query-level experiment (config.query_level)

    @property
    def group(self) -> list[Head]:
        return [s.head for s in self.sahara_steps]

    @property
    def scores(self) -> HeadScores:
        return self.ships

    def to_json(self) -> dict[str, Any]:
        from probe.results import to_jsonable

        return {"ships": self.ships.to_json(), "generalized": self.generalized.to_json(),
                "sahara_steps": [{"head": str(s.head), "score": s.score, "candidate_scores": s.candidate_scores}
                                 for s in self.sahara_steps],
                "validation": [asdict(v) for v in self.validation], "summary": to_jsonable(self.summary),
                "examples": self.examples, "rendered_prompt_example": self.rendered_prompt_example,
                "per_prompt_top": self.per_prompt_top, "timings": self.timings,
                "provenance": to_jsonable(self.provenance), "query_level": to_jsonable(self.query_level)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SafetyResult:
        return cls(HeadScores.from_json(data["ships"]), HeadScores.from_json(data["generalized"]),
                   [SaharaStep(Head.parse(s["head"]), s["score"], s["candidate_scores"]) for s in data["sahara_steps"]],
                   [ConditionResult(**v) for v in data["validation"]], data["summary"], data["examples"],
                   data["rendered_prompt_example"], data["per_prompt_top"], data["timings"],
                   Provenance.from_json(data["provenance"]), data.get("query_level", {}))
