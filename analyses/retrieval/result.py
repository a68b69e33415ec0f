"""What a retrieval-heads run returns (scores, samples, masking, split) and its plain-text summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from analyses.retrieval.config import RetrievalError
from probe.heads import Head
from probe.results import HeadScores, Provenance, to_jsonable


@dataclass
class MaskingResult:
    """NIAH ROUGE-1 recall per prompt under each masking condition.

    `conditions[i]` = {kind, selection ('none'|'top'|'random'), k, draw, heads}; `recall[i][j]` is the
    recall on prompt j (`prompts[j]`) under condition i.
    """

    conditions: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    recall: list[list[float]]
    responses: list[list[str]]
    seconds: float = 0.0
    stemmed: bool = True  # `recall` with Porter stemming (the authors' code); `recall_other` without (or vice versa)
    recall_other: list[list[float]] | None = None
    excluded: list[str] | None = None  # heads no random set could contain (top list + all above threshold)
    skipped: list[dict[str, Any]] | None = None  # masking prompts whose needle could not be located
    rouge_threshold: float = 0.5

    def stem_changes(self) -> dict[str, int]:
        """How many (condition, prompt) answers change between stemmed and unstemmed ROUGE-1: in recall,
        and in the success verdict (recall > threshold)."""
        if self.recall_other is None:
            return {"answers": 0, "recall_changed": 0, "verdict_changed": 0}
        pairs = [(a, b) for mine, theirs in zip(self.recall, self.recall_other) for a, b in zip(mine, theirs)]
        t = self.rouge_threshold
        return {"answers": len(pairs), "recall_changed": sum(abs(a - b) > 1e-12 for a, b in pairs),
                "verdict_changed": sum((a > t) != (b > t) for a, b in pairs)}

    def accuracy(self, index: int) -> float:
        values = self.recall[index]
        return float(sum(values) / len(values)) if values else float("nan")

    def find(self, kind: str, selection: str, k: int) -> list[int]:
        return [i for i, c in enumerate(self.conditions)
                if c["selection"] == selection and (selection == "none" or (c["kind"] == kind and c["k"] == k))]

    def table(self) -> list[dict[str, Any]]:
        """One row per (kind, k): accuracy with the top heads, every random draw, and no masking."""
        base = self.accuracy(self.find("", "none", 0)[0])
        rows = []
        kinds = sorted({c["kind"] for c in self.conditions if c["selection"] != "none"})
        ks = sorted({c["k"] for c in self.conditions if c["selection"] != "none"})
        for kind in kinds:
            for k in ks:
                top = [self.accuracy(i) for i in self.find(kind, "top", k)]
                random_acc = [self.accuracy(i) for i in self.find(kind, "random", k)]
                if not top:
                    continue
                rows.append({"kind": kind, "k": k, "none": base, "top": top[0], "random": random_acc,
                             "random_mean": sum(random_acc) / len(random_acc) if random_acc else float("nan")})
        return rows

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MaskingResult:
        return cls(**data)


@dataclass
class RetrievalResult:
    """Scores (headline: config.score_mode, gated), both variants gated and ungated, per-sample detail."""

    scores: HeadScores
    variants: dict[str, HeadScores]  # events, unique, events_ungated, unique_ungated
    per_sample: dict[str, torch.Tensor]  # events|unique -> [S, L, H], already divided by |answer span|
    samples: list[dict[str, Any]]  # summary + response + rouge + retained + distance
    skipped: list[dict[str, Any]]
    config: dict[str, Any]
    template: str
    group_size: int
    n_kv_heads: int
    provenance: Provenance
    masking: MaskingResult | None = None
    seconds: float = 0.0
    split: dict[str, Any] | None = None  # masking vs detection grid: needles/depths/haystack each used, overlap

    @property
    def attempted(self) -> int:
        return len(self.samples) + len(self.skipped)

    @property
    def retained(self) -> int:
        return sum(1 for s in self.samples if s["retained"])

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    def retrieval_heads(self) -> list[tuple[Head, float]]:
        return self.scores.above(self.threshold)

    def stem_changes(self) -> dict[str, Any]:
        """Detection samples whose ROUGE-1 success verdict differs between stemmed and unstemmed words
        (the gate decides which samples are scored), with their labels."""
        t = float(self.config.get("rouge_threshold", 0.5))
        changed = [s for s in self.samples if "rouge1_recall_stemmed" in s
                   and (s["rouge1_recall_stemmed"] > t) != (s["rouge1_recall_unstemmed"] > t)]
        return {"samples": len(self.samples), "verdict_changed": len(changed),
                "pass_only_stemmed": sum(s["rouge1_recall_stemmed"] > t for s in changed),
                "changed": [f"needle {s['needle_index']}, {s['context_length']} tokens, depth {s['depth']:g}%"
                            for s in changed]}

    def kv_scores(self, how: str = "max") -> torch.Tensor:
        """Headline scores per KV group `[L, n_kv]`: max or mean over the group's query heads."""
        grouped = self.scores.scores.view(self.scores.n_layers, self.n_kv_heads, self.group_size)
        if how == "max":
            return grouped.max(-1).values
        if how == "mean":
            return grouped.mean(-1)
        raise RetrievalError(f"KV aggregation must be max or mean, got {how!r}.")

    def split_by_distance(self, window: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Headline per-head means over retained samples whose needle ends < window / >= window tokens
        before the first answer row (Gemma 3: only global layers see past the 512-token window)."""
        mode = self.config["score_mode"]
        parts: dict[str, tuple[torch.Tensor, int]] = {}
        for name, test in (("near", lambda d: d < window), ("far", lambda d: d >= window)):
            picked = [i for i, s in enumerate(self.samples) if s["retained"] and test(s["needle_distance"])]
            values = (self.per_sample[mode][picked].mean(0) if picked
                      else torch.full(self.scores.scores.shape, float("nan"), dtype=torch.float64))
            parts[name] = (values, len(picked))
        return parts

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores.to_json(),
            "variants": {k: v.to_json() for k, v in self.variants.items()},
            "per_sample": {k: to_jsonable(v.to(torch.float64)) for k, v in self.per_sample.items()},
            "samples": to_jsonable(self.samples), "skipped": to_jsonable(self.skipped),
            "config": to_jsonable(self.config), "template": self.template, "group_size": self.group_size,
            "n_kv_heads": self.n_kv_heads, "provenance": to_jsonable(self.provenance),
            "masking": self.masking.to_json() if self.masking else None, "seconds": self.seconds,
            "split": to_jsonable(self.split), "stem_changes": to_jsonable(self.stem_changes()),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrievalResult:
        return cls(
            scores=HeadScores.from_json(data["scores"]),
            variants={k: HeadScores.from_json(v) for k, v in data["variants"].items()},
            per_sample={k: torch.tensor(v, dtype=torch.float64) for k, v in data["per_sample"].items()},
            samples=data["samples"], skipped=data["skipped"], config=data["config"], template=data["template"],
            group_size=data["group_size"], n_kv_heads=data["n_kv_heads"],
            provenance=Provenance.from_json(data["provenance"]),
            masking=MaskingResult.from_json(data["masking"]) if data.get("masking") else None,
            seconds=data.get("seconds", 0.0), split=data.get("split"),
        )



def summary_text(result: RetrievalResult, top: int = 10) -> str:
    """A few lines for the CLI and reports."""
    lines = [
        f"retrieval heads on {result.provenance.model_spec} ({result.template} template): "
        f"{result.retained}/{result.attempted} samples retained "
        f"({sum(s['success'] for s in result.samples)} retrieved, {len(result.skipped)} skipped)",
        f"heads > {result.threshold:g}: {len(result.retrieval_heads())} of {result.scores.scores.numel()}",
        "top: " + ", ".join(f"{h} {s:.2f}" for h, s in result.scores.top(top)),
    ]
    changes = result.stem_changes()
    lines.append(f"ROUGE-1 {'stemmed' if result.config.get('rouge_stem', True) else 'unstemmed'}: stemming changes "
                 f"{changes['verdict_changed']} of {changes['samples']} detection verdicts")
    if result.split:
        det, mask = result.split["detection"], result.split["masking"]
        label = "IN-SAMPLE (allow_in_sample)" if result.split["in_sample"] else "held out"
        lines.append(f"masking {label}: detect needles {det['needles']} depths {det['depths']}; "
                     f"mask needles {mask['needles']} depths {mask['depths']}; "
                     f"{result.split['overlap']['haystack_sentences']} haystack sentences shared")
    if result.masking:
        for row in result.masking.table():
            lines.append(f"mask {row['kind']} k={row['k']}: none {100 * row['none']:.0f}%, top {100 * row['top']:.0f}%, "
                         f"random {', '.join(f'{100 * a:.0f}' for a in row['random'])}%")
        moved = result.masking.stem_changes()
        lines.append(f"masking: stemming changes the recall of {moved['recall_changed']} and the verdict of "
                     f"{moved['verdict_changed']} of {moved['answers']} masked answers; random sets avoid "
                     f"{len(result.masking.excluded or [])} heads (top list + all above {result.threshold:g})")
    return "\n".join(lines)


def summary(result: RetrievalResult) -> str:
    """The plain-text summary the scan and the app show (same as `summary_text`)."""
    return summary_text(result)
