"""The index-mod-10 linear probe on the effective embeddings, one task held out at a time: does e(t)
carry an item's position in its sequence in a form shared across tasks?"""

from __future__ import annotations

import math

import torch
from torch import nn

from analyses.data.succession import TaskSet


def _unique_items(task_set: TaskSet, embeddings: torch.Tensor) -> tuple[list[int], list[int], list[str], torch.Tensor]:
    """Every distinct task token once: ids, indices, task names and effective embeddings."""
    ids, indices, tasks, rows = [], [], [], []
    seen: set[int] = set()
    position = 0
    for task in task_set.tasks:
        for token, index in zip(task.token_ids, task.indices):
            if token not in seen:
                seen.add(token)
                ids.append(token)
                indices.append(index)
                tasks.append(task.task)
                rows.append(position)
            position += 1
    return ids, indices, tasks, embeddings[rows]


def _fit_softmax_probe(X: torch.Tensor, y: torch.Tensor, n_classes: int,
                       l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L2, LBFGS) on centred, globally scaled features; returns (W, b)."""
    torch.manual_seed(0)
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([W, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(X @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return W.detach(), b.detach()


def mod10_probe(task_set: TaskSet, embeddings: torch.Tensor, l2: float = 1e-2) -> dict[str, dict[str, float]]:
    """Leave-one-task-out probe of index mod 10 on the effective embeddings.

    Chance is 0.1; `majority` is the accuracy of always answering the commonest training residue.
    """
    _, indices, tasks, E = _unique_items(task_set, embeddings)
    X = E.double()
    y = torch.tensor([i % 10 for i in indices])
    names = list(dict.fromkeys(tasks))
    mask_of = {name: torch.tensor([t == name for t in tasks]) for name in names}
    results: dict[str, dict[str, float]] = {}
    for held_out in names:
        test = mask_of[held_out]
        train = ~test
        if int(train.sum()) < 10 or len(set(y[train].tolist())) < 2:
            continue
        # One scale for all features: per-feature standardising would blow up directions that only
        # vary by noise in the training tasks (e.g. decades that only the held-out task has).
        mean = X[train].mean(0)
        std = (X[train] - mean).pow(2).sum(-1).mean().sqrt() / math.sqrt(X.shape[1]) + 1e-12
        W, b = _fit_softmax_probe((X[train] - mean) / std, y[train], 10, l2)
        predicted = (((X[test] - mean) / std) @ W + b).argmax(-1)
        commonest = int(torch.bincount(y[train], minlength=10).argmax())
        results[held_out] = {
            "accuracy": float((predicted == y[test]).double().mean()),
            "n_test": int(test.sum()), "n_train": int(train.sum()), "chance": 0.1,
            "majority": float((y[test] == commonest).double().mean()),
        }
    return results
