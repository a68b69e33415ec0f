"""Generalized Ships and Sahara (dataset level): principal angles between the final-norm states of a
prompt set, base vs ablated, and the greedy group search under that score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analyses.common import Progress, no_progress
from analyses.safety.errors import SafetyError
from analyses.safety.readouts import ablate, ablated_readouts, clean_run
from probe.heads import Head
from probe.interventions import intervene
from probe.models import LoadedModel


def subspace_angle(base: torch.Tensor, ablated: torch.Tensor, r_main: int = 1, center: bool = False) -> torch.Tensor:
    """Sum of principal angles (degrees) between the top-`r_main` left singular subspaces of N x d matrices.

    `base` is `[N, d]`, `ablated` `[..., N, d]` (batched). With r_main = 1 and no centring this is the
    authors' code's `degrees(arccos(|u_base . u_abl|))`, in [0, 90].
    """
    if center:
        base = base - base.mean(-2, keepdim=True)
        ablated = ablated - ablated.mean(-2, keepdim=True)
    n = base.shape[-2]
    if not 1 <= r_main <= n:
        raise SafetyError(f"r_main must be between 1 and the number of prompts ({n}), got {r_main}.")
    u_base = torch.linalg.svd(base.double(), full_matrices=False).U[..., :r_main]
    u_abl = torch.linalg.svd(ablated.double(), full_matrices=False).U[..., :r_main]
    cosines = torch.linalg.svdvals(u_base.transpose(-1, -2) @ u_abl).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).sum(-1).float()


@torch.no_grad()
def dataset_states(model: LoadedModel, prompts: Sequence[torch.Tensor], groups: Sequence[Sequence[Head]],
                   ablation: str, epsilon: float, batch_rows: int = 32, fast: bool = True,
                   progress: Progress = no_progress, progress_span: tuple[float, float] = (0.0, 1.0)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base `[N, d]`, ablated `[G, N, d]`) final-norm last-position states over a prompt set."""
    if not prompts:
        raise SafetyError("The prompt set is empty: the dataset-level score needs at least one prompt.")
    base = torch.empty((len(prompts), model.d_model))
    ablated = torch.empty((len(groups), len(prompts), model.d_model))
    lo, hi = progress_span
    for n, ids in enumerate(prompts):
        clean = clean_run(model, ids, keep_residual=fast)
        base[n] = clean.final.cpu()
        ablated[:, n], _ = ablated_readouts(model, clean, groups, ablation, epsilon, batch_rows,
                                            want_log_probs=False, fast=fast)
        progress(lo + (hi - lo) * (n + 1) / len(prompts), f"prompt {n + 1}/{len(prompts)}")
    return base, ablated


def generalized_ships(model: LoadedModel, prompts: Sequence[torch.Tensor], ablation: str = "query",
                      epsilon: float = 1e-5, heads: Sequence[Head] | None = None, r_main: int = 1,
                      center: bool = False, batch_rows: int = 32, fast: bool = True) -> torch.Tensor:
    """Dataset-level Ships of each single head: `[n_layers, n_heads]` angle in degrees (NaN = not scored)."""
    heads = list(heads) if heads is not None else model.all_heads()
    base, ablated = dataset_states(model, prompts, [[h] for h in heads], ablation, epsilon, batch_rows, fast)
    angles = subspace_angle(base, ablated, r_main, center)
    scores = torch.full((model.n_layers, model.n_heads), float("nan"))
    for head, angle in zip(heads, angles):
        scores[head.layer, head.head] = angle
    return scores


@dataclass
class SaharaStep:
    """One greedy step: the head added, the group's score, and every candidate's score."""

    head: Head
    score: float
    candidate_scores: dict[str, float]


def sahara(model: LoadedModel, prompts: Sequence[torch.Tensor], size: int = 5, ablation: str = "query",
           epsilon: float = 1e-5, r_main: int = 1, center: bool = False, candidates: int | None = None,
           batch_rows: int = 32, fast: bool = True, progress: Progress = no_progress) -> list[SaharaStep]:
    """Greedy group search (Algorithm 1): each step adds the head that most raises the group's score.

    `candidates=None` scores every head at every step (the paper). `candidates=k` scores all heads
    at step 1 and only the k best of step 1 afterwards (an approximation we label; the trace says so).
    """
    if size < 1:
        raise SafetyError(f"The Sahara group size must be at least 1, got {size}.")
    pool = model.all_heads()
    if size > len(pool):
        raise SafetyError(f"Cannot pick {size} heads from a model with {len(pool)} heads.")
    group: list[Head] = []
    steps: list[SaharaStep] = []
    for step in range(size):
        options = [h for h in pool if h not in group]
        span = (step / size, (step + 1) / size)
        base, ablated = dataset_states(model, prompts, [group + [h] for h in options], ablation, epsilon,
                                       batch_rows, fast, progress, span)
        angles = subspace_angle(base, ablated, r_main, center)
        best = int(torch.argmax(angles))
        group.append(options[best])
        steps.append(SaharaStep(options[best], float(angles[best]),
                                {str(h): float(a) for h, a in zip(options, angles)}))
        if step == 0 and candidates is not None:
            ranked = sorted(options, key=lambda h: -steps[0].candidate_scores[str(h)])
            pool = ranked[: max(candidates, size)]
    return steps


def sahara_reference(model: LoadedModel, prompts: Sequence[torch.Tensor], size: int, ablation: str = "query",
                     epsilon: float = 1e-5, r_main: int = 1, center: bool = False) -> list[Head]:
    """Slow reference of Algorithm 1: full forward per (group, prompt), plain loops, no batching."""
    group: list[Head] = []
    with torch.no_grad():
        base = torch.stack([model.run_with_cache(ids, names_filter=lambda n: n == "ln_final.hook_out")[1]
                            ["ln_final.hook_out"][0, -1].float() for ids in prompts])
        for _ in range(size):
            best, best_score = None, -math.inf
            for head in model.all_heads():
                if head in group:
                    continue
                rows = []
                for ids in prompts:
                    with intervene(model, ablate(group + [head], ablation, epsilon)):
                        _, cache = model.run_with_cache(ids, names_filter=lambda n: n == "ln_final.hook_out")
                    rows.append(cache["ln_final.hook_out"][0, -1].float())
                score = float(subspace_angle(base, torch.stack(rows), r_main, center))
                if score > best_score:
                    best, best_score = head, score
            group.append(best)  # type: ignore[arg-type]
    return group
