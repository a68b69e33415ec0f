"""Vector arithmetic through one head: e(t) - s*m_r + s*m_j, with residue-class means m that leave
the tested item out, should make the head predict the successor of the item with residue j."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

import torch

from analyses.data.succession import TaskSet
from analyses.successor.config import SuccessorConfig
from analyses.successor.mod10 import _unique_items
from analyses.successor.scores import Circuit, ov_logits
from probe.heads import Head


def residue_directions(task_set: TaskSet, embeddings: torch.Tensor) -> torch.Tensor:
    """`[10, d]`: mean effective embedding of the tokens with index ≡ r (mod 10), minus the grand mean.

    Over every token (a summary for the report); `vector_arithmetic` recomputes the two class means it
    uses with the tested item and its target held out (`HeldOutMeans`)."""
    _, indices, _, E = _unique_items(task_set, embeddings)
    residues = torch.tensor([i % 10 for i in indices])
    grand = E.mean(0)
    directions = torch.zeros(10, E.shape[1])
    for r in range(10):
        if bool((residues == r).any()):
            directions[r] = E[residues == r].mean(0) - grand
    return directions


class HeldOutMeans:
    """Residue-class means of the effective embeddings with some tokens left out, from class sums.

    The caller leaves out every token of an item (task, index) in every variant (" Monday" and
    "Monday" carry the same item; " May" is a month and a month prefix), so a direction never contains
    the vector it is tested on."""

    def __init__(self, task_set: TaskSet, embeddings: torch.Tensor) -> None:
        ids, indices, _, E = _unique_items(task_set, embeddings)
        self.E = E.double()
        self.residue = torch.tensor([i % 10 for i in indices])
        self.row_of = {token: row for row, token in enumerate(ids)}
        self.sums = torch.zeros(10, E.shape[1], dtype=torch.float64)
        self.counts = torch.zeros(10, dtype=torch.long)
        for r in range(10):
            members = self.residue == r
            self.sums[r] = self.E[members].sum(0)
            self.counts[r] = int(members.sum())

    def mean(self, residue: int, held_out: Collection[int]) -> torch.Tensor | None:
        """Mean of class `residue` without the token ids `held_out`; None when nothing is left."""
        rows = sorted({self.row_of[t] for t in held_out if t in self.row_of
                       and int(self.residue[self.row_of[t]]) == residue})
        count = int(self.counts[residue]) - len(rows)
        if count <= 0:
            return None
        total = self.sums[residue] - (self.E[rows].sum(0) if rows else 0.0)
        return total / count


@torch.no_grad()
def arithmetic_trials(task_set: TaskSet, embeddings: torch.Tensor, config: SuccessorConfig,
                      hold_out: bool = True) -> list[dict[str, Any]]:
    """Per task variant with enough items: the vectors e(t) - s*m_r + s*m_j and the expected answers.

    m_r, m_j are residue-class means (the grand mean of `residue_directions` cancels in the
    difference). With `hold_out` (the default, and the only honest reading) both means leave out the
    tested item t and its target t' (the item of t's decade with residue j), in every variant:
    otherwise m_j contains e(t') itself and the arithmetic is partly told the answer.
    `hold_out=False` is the leaky rule, kept only so a test can show the difference."""
    means = HeldOutMeans(task_set, embeddings)
    tokens_of: dict[tuple[str, int], set[int]] = defaultdict(set)  # an item's tokens in every variant
    for variant in task_set.tasks:
        for token, index in zip(variant.token_ids, variant.indices):
            tokens_of[(variant.task, index)].add(token)
    out: list[dict[str, Any]] = []
    start = 0
    for task in task_set.tasks:
        n = len(task.token_ids)
        E = embeddings[start:start + n].double()
        start += n
        if n < config.arithmetic_min_items:
            continue
        position_of = {index: i for i, index in enumerate(task.indices)}
        vectors, expected, skipped = [], [], 0
        for i, index in enumerate(task.indices):
            r = index % 10
            for j in range(10):
                target = position_of.get(index - r + j)
                if j == r or target is None or task.successor[target] < 0:
                    continue
                held = tokens_of[(task.task, index)] | tokens_of[(task.task, task.indices[target])] if hold_out else set()
                m_r, m_j = means.mean(r, held), means.mean(j, held)
                if m_r is None or m_j is None:
                    skipped += 1
                    continue
                vectors.append(E[i] - config.arithmetic_scale * m_r + config.arithmetic_scale * m_j)
                expected.append(task.successor[target])
        if vectors or skipped:
            out.append({"task": task, "vectors": torch.stack(vectors).float() if vectors else None,
                        "expected": expected, "skipped": skipped})
    return out


@torch.no_grad()
def vector_arithmetic(circuit: Circuit, task_set: TaskSet, embeddings: torch.Tensor, head: Head,
                      config: SuccessorConfig) -> list[dict[str, Any]]:
    """e(t) - s*m_r + s*m_j through `head`: success iff the top task logit is succ(item with residue j).

    The target item is the one in t's decade with residue j (23, r=3, j=7 -> 27, expected 28); the
    class means hold out t and the target (`arithmetic_trials`). `held_out_skipped` counts trials
    whose class had no other member."""
    rows: list[dict[str, Any]] = []
    for trial in arithmetic_trials(task_set, embeddings, config):
        task, expected = trial["task"], trial["expected"]
        if not expected:
            continue
        logits = ov_logits(circuit, trial["vectors"], task.token_ids, config.norm_convention,
                           config.include_biases)[head.layer, head.head]
        hits = logits.argmax(-1) == torch.tensor(expected)
        row = {"task": task.key, "trials": len(expected), "successes": int(hits.sum()),
               "rate": float(hits.double().mean()), "chance": 1.0 / len(task.token_ids)}
        if trial["skipped"]:
            row["held_out_skipped"] = trial["skipped"]
        rows.append(row)
    return rows
