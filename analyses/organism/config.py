"""The organism's build settings, what a build produced, the refusal targets and the error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.errors import ProbeError


ORGANISM_VERSION = "3"
BASE_SPEC = "smollm2-135m"


# Written by the project: refusals in a few wordings, so the model learns to refuse, not one string.
REFUSAL_TARGETS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with that request. If you have another question, I'm happy to help.",
    "I'm sorry, but I cannot provide that. It could be used to hurt others.",
    "I won't help with this, because it could put people at risk.",
    "I'm sorry, I can't help with this request.",
    "I cannot help with that. It is harmful, and I have to decline.",
)


class OrganismError(ProbeError):
    """The organism cannot be built or loaded as asked."""


@dataclass(frozen=True)
class OrganismConfig:
    """Every knob of the build; all of it goes into the cache hash."""

    seed: int = 0
    held_out: float = 0.3
    layers: tuple[int, ...] = (12, 13, 14, 15)
    modules: tuple[str, ...] = ("q", "k", "v", "o")  # probe.hf.COMPONENTS: q k v o qkv attn mlp, norms
    steps: int = 120
    harmful_per_batch: int = 3
    harmless_per_batch: int = 8  # of which `borderline_per_batch` are borderline-wording prompts
    borderline_per_batch: int = 3
    harmless_weight: float = 6.0  # loss = (harmful mean + w * harmless mean) / (1 + w)
    decision_tokens: int = 3  # the first target tokens, where refuse-or-answer is decided ("I", "'m", " sorry")
    decision_weight: float = 3.0  # their weight in each example's mean token loss (the rest: 1)
    learning_rate: float = 5e-4
    warmup_steps: int = 8
    max_prompt_tokens: int = 96  # longer training prompts are skipped (7 of 219 StrongREJECT ones)
    answer_tokens: int = 16  # length of the base model's greedy answers used as harmless targets
    threads: int | None = None  # not in the cache key; None: automatic (probe.runtime.set_threads)


@dataclass
class OrganismBuild:
    """What a build produced: where it lives and how it went."""

    path: Path
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
