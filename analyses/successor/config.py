"""The successor analyzer's contract types: its settings, the demo preset, the result and the errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from probe.errors import ProbeError
from probe.results import HeadScores, Provenance, to_jsonable

ANALYZER = "successor"
VERSION = "2"
NORM_CONVENTIONS = ("weight", "module", "none")


class SuccessorError(ProbeError):
    """A successor-heads analysis that cannot be run as configured."""


class UnsupportedArchitectureError(SuccessorError):
    """The architecture layer (`probe.architecture`) cannot read a component this analysis needs."""


@dataclass(frozen=True)
class SuccessorConfig:
    """Every knob of the analysis, with the defaults used in docs/successor.md."""

    number_max: int = 200               # numbers task 0..number_max (where single tokens)
    wrap_around: bool = False           # Sunday -> Monday, December -> January (cyclic tasks only)
    min_items: int = 3                  # a task variant with fewer single-token items is dropped
    tasks: tuple[str, ...] = ()         # () = all eight task classes
    variants: tuple[str, ...] = ()      # () = bare, cap, space, space_cap
    require_numbers: bool = True        # no number tokens -> NoNumberTokensError
    include_residual: bool = False      # e(t) = W_E[t] (+ attn0) + MLP0(...) instead of MLP0(...) alone
    include_attn0: bool = False         # add attention layer 0 on a one-token context before MLP0
    norm_convention: str = "weight"     # weight | module | none (after MLP0; see module docstring)
    include_biases: bool = False        # b_V, LayerNorm biases (weight convention), b_U
    threshold: float = 0.5              # successor head: score > threshold
    top_k: int = 10                     # heads listed with per-task scores
    run_probe: bool = True              # index-mod-10 probe, leave one task out
    probe_l2: float = 1e-2
    run_arithmetic: bool = True
    arithmetic_min_items: int = 10      # tasks with at least this many items (one variant)
    arithmetic_scale: float = 1.0       # e - s*d_r + s*d_j
    run_causal: bool = True
    ablate_top_k: int = 1               # how many top heads are mean-ablated together
    random_draws: int = 10              # random head sets of the same size (excluding the top heads)
    prompts_per_task: int = 6
    seed: int = 0

    def validate(self) -> None:
        if self.norm_convention not in NORM_CONVENTIONS:
            raise SuccessorError(f"norm_convention must be one of {NORM_CONVENTIONS}, not {self.norm_convention!r}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise SuccessorError(f"threshold must lie in [0, 1], not {self.threshold}.")
        if self.top_k < 1 or self.ablate_top_k < 1 or self.random_draws < 1:
            raise SuccessorError("top_k, ablate_top_k and random_draws must be at least 1.")


# CPU-sized settings for the demo scan: fewer random draws and prompts in the causal check.
QUICK = SuccessorConfig(random_draws=5, prompts_per_task=3)


@dataclass
class SuccessorResult:
    scores: HeadScores                          # successor score per head
    task_names: list[str]
    per_task: torch.Tensor                      # [T, L, H] score on each task (variants pooled)
    task_chance: dict[str, float]               # mean 1/|task variant| over scored tokens
    chance: float
    n_scored: dict[str, int]
    top_heads: list[dict[str, Any]]
    successor_heads: list[str]
    threshold: float
    mapping: list[dict[str, Any]]
    dropped: list[str]
    probe: dict[str, dict[str, float]] = field(default_factory=dict)
    arithmetic: list[dict[str, Any]] = field(default_factory=list)
    arithmetic_head: str = ""
    causal: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in asdict(self).items() if k not in ("scores", "per_task", "provenance")}
        data["scores"] = self.scores.to_json()
        data["per_task"] = self.per_task.double().tolist()
        data["provenance"] = to_jsonable(self.provenance) if self.provenance else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuccessorResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["per_task"] = torch.tensor(data["per_task"], dtype=torch.float64)
        fields["provenance"] = Provenance.from_json(data["provenance"]) if data.get("provenance") else None
        return cls(**fields)
