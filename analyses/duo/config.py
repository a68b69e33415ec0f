"""Duo's settings, its result and its error: what the registry, the faces and the cache read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from probe.errors import ProbeError
from probe.results import HeadScores, Provenance, to_jsonable

ANALYZER = "duo"
VERSION = "2"  # the objective: teacher full branch, final norm with its weight, a fresh sample per step
REGIMES = ("decode-only", "all-positions")
# which hidden states the full-attention branch of a gated head reads: "teacher" (the authors' code: the
# frozen full model's, so the distance measures only what streaming heads lose) or "student" (the
# student's own, drifted states: what a retrieval head actually reads at deployment, where errors of
# earlier streaming heads compound through it; kept to measure that deployment-like drift)
FULL_BRANCHES = ("teacher", "student")


class DuoError(ProbeError):
    """A DuoAttention setting that cannot work on this model."""


@dataclass(frozen=True)
class DuoConfig:
    """Every knob; defaults sized for a 2-core CPU (raise lengths/steps on a GPU)."""

    context_length: int = 384          # haystack tokens per training prompt
    n_passkeys: int = 3
    passkey_words: int = 8
    sink: int = 16
    recent: int = 64
    steps: int = 60
    max_seconds: float = 600.0         # stop training early when this wall-clock budget is spent
    lr: float = 0.02
    reg_weight: float = 0.05           # λ
    retrieval_fraction: float = 0.5    # share of KV heads kept as retrieval heads at deployment
    regime: str = "decode-only"        # decode-only | all-positions (which queries streaming heads restrict)
    full_branch: str = "teacher"       # teacher (authors' code) | student: whose states the full branch reads
    eval_lengths: tuple[int, ...] = (512,)
    eval_depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    eval_needles: tuple[int, ...] = (0, 1)
    template: str = "auto"             # auto: chat if the model has a chat template, else base
    random_draws: int = 3
    max_new_tokens: int = 24
    memory_context: int = 8192         # context length at which the KV-cache saving is reported
    seed: int = 0

    def validate(self) -> None:
        if self.full_branch not in FULL_BRANCHES:
            raise DuoError(f"Unknown full_branch {self.full_branch!r}; choose {', '.join(FULL_BRANCHES)}.")
        if self.regime not in REGIMES:
            raise DuoError(f"Unknown regime {self.regime!r}; choose {', '.join(REGIMES)}.")
        if not 0 < self.retrieval_fraction < 1:
            raise DuoError("retrieval_fraction must be strictly between 0 and 1.")
        if self.sink < 0 or self.recent < 1 or self.steps < 1 or self.n_passkeys < 1:
            raise DuoError("sink >= 0, recent >= 1, steps >= 1 and n_passkeys >= 1 are required.")


# Demo-scan size; raise steps for a real run. 256 haystack tokens keep the quick scan's peak memory
# bounded: training on SmolLM2 peaked at 2.7 GB with 384 (each layer recomputed in the backward),
# 1.7 GB with 256 (bench/bench_memory.py).
# max_seconds is a safety net, not part of the preset: a cap the run reaches makes the gates depend on the
# machine's speed (240 s stopped one quick scan after 4 steps at load ~9 and let another do all 20: gate
# Pearson 0.50). 20 fused steps take ~100 s on one idle 2-core CPU thread.
QUICK = DuoConfig(steps=20, max_seconds=1200.0, context_length=256)


@dataclass
class DuoResult:
    scores: HeadScores           # gate of each query head's KV group, [L, H] (for the atlas)
    gates: torch.Tensor          # [L, n_kv]
    retrieval_kv: list[list[bool]]
    losses: list[float]
    distill: list[float]
    gate_history: list[list[list[float]]]
    train_seconds: float
    steps_done: int
    regime: str
    niah: dict[str, Any]
    memory: list[dict[str, float]]
    profiling_spearman: float
    retrieval_spearman: float | None
    provenance: Provenance | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in asdict(self).items() if k not in ("scores", "provenance")}
        data["scores"] = self.scores.to_json()
        data["provenance"] = to_jsonable(self.provenance) if self.provenance else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DuoResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["gates"] = torch.tensor(data["gates"], dtype=torch.float64)
        fields["provenance"] = Provenance.from_json(data["provenance"]) if data.get("provenance") else None
        return cls(**fields)
