"""Original vs intervened: next-token distributions and greedy generations side by side.

One function (`intervention_effects`) serves `probe run`, the app's playground and the notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probe.errors import PromptTooLongError
from probe.interventions import Intervention, intervene
from probe.loaded import LoadedModel


@dataclass(frozen=True)
class TokenProb:
    token_id: int
    token: str
    prob: float


@dataclass
class Side:
    """One run (original or intervened) of the prompt."""

    top: list[TokenProb]
    probs: torch.Tensor = field(repr=False)  # full next-token distribution [vocab]
    generation: str | None = None


@dataclass
class InterventionEffects:
    prompt: str
    n_tokens: int
    interventions: list[str]
    original: Side
    intervened: Side

    @property
    def total_variation(self) -> float:
        """Half the L1 distance between the two next-token distributions (0 = identical, 1 = disjoint)."""
        return float(0.5 * (self.original.probs - self.intervened.probs).abs().sum())

    @property
    def kl(self) -> float:
        """KL(original ‖ intervened) in nats."""
        p, q = self.original.probs.double(), self.intervened.probs.double()
        return float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum())

    def prob_of(self, token_id: int) -> tuple[float, float]:
        return float(self.original.probs[token_id]), float(self.intervened.probs[token_id])

    def to_json(self) -> dict:
        def side(s: Side) -> dict:
            return {"top": [t.__dict__ for t in s.top], "generation": s.generation}

        return {"prompt": self.prompt, "n_tokens": self.n_tokens, "interventions": self.interventions,
                "original": side(self.original), "intervened": side(self.intervened),
                "total_variation": self.total_variation, "kl": self.kl}


def _side(model: LoadedModel, ids: torch.Tensor, top_k: int, generate: int) -> Side:
    probs = torch.softmax(model.logits(ids, positions="last")[0, -1].float(), dim=-1).cpu()
    values, indices = probs.topk(top_k)
    top = [TokenProb(int(i), model.decode([int(i)]), float(v)) for v, i in zip(values, indices)]
    text = model.decode(model.generate(ids, max_new_tokens=generate)) if generate > 0 else None
    return Side(top=top, probs=probs, generation=text)


def check_room(model: LoadedModel, n_prompt: int, generate: int = 0) -> None:
    """The prompt and the tokens to generate fit the context; the error says which is which."""
    if generate and n_prompt + generate > model.n_ctx:
        raise PromptTooLongError(
            f"The prompt ({n_prompt} tokens) plus {generate} generated tokens exceed the context of "
            f"{model.n_ctx} tokens of {model.spec}; generate at most {max(0, model.n_ctx - n_prompt)}.")
    model.check_fits(n_prompt)


def intervention_effects(model: LoadedModel, prompt: str, interventions: Sequence[Intervention],
                         top_k: int = 10, generate: int = 0) -> InterventionEffects:
    """Run `prompt` with and without `interventions` (hooks removed afterwards)."""
    ids = model.encode(prompt)
    check_room(model, int(ids.shape[-1]), generate)
    original = _side(model, ids, top_k, generate)
    with intervene(model, list(interventions)):
        intervened = _side(model, ids, top_k, generate)
    return InterventionEffects(prompt, int(ids.shape[-1]), [i.describe() for i in interventions], original,
                               intervened)
