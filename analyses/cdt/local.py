"""Local interpretation: which words of one prompt drive a logit difference, by CD-T and by occlusion.

CD-T: one row per word; β = that word's token embeddings (positions stay in γ), propagated to the
logit difference at the last position (one batched pass for all words). Occlusion (leave-one-out):
the drop in the logit difference when the word's tokens are deleted from the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analyses.cdt.engine import Engine


@dataclass
class TokenRelevance:
    words: list[str]
    cdt: list[float]
    occlusion: list[float]
    full: float

    def rank_agreement(self) -> float:
        """Spearman correlation between the two attributions (ties broken by order)."""
        a = torch.tensor(self.cdt).argsort().argsort().double()
        b = torch.tensor(self.occlusion).argsort().argsort().double()
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _word_spans(model, text: str) -> tuple[torch.Tensor, list[str], list[list[int]]]:
    """Token ids of `text` and, per whitespace word, the token positions that make it up."""
    words = text.split(" ")
    ids = model.encode(text)[0]
    spans, offset = [], int(len(model.encode("")[0]))
    for index in range(len(words)):
        prefix = " ".join(words[: index + 1])
        end = len(model.encode(prefix)[0])
        spans.append(list(range(offset, end)))
        offset = end
    return ids, words, spans


@torch.no_grad()
def token_relevance(model, text: str, good: str, bad: str, engine: Engine | None = None) -> TokenRelevance:
    """CD-T word relevance to logit(good) − logit(bad) after `text`, and leave-one-out occlusion."""
    engine = engine or Engine(model)
    ids, words, spans = _word_spans(model, text)
    good_id = model.tokenizer(good, add_special_tokens=False).input_ids[0]
    bad_id = model.tokenizer(bad, add_special_tokens=False).input_ids[0]
    rows = ids.expand(len(words), -1)
    relevant = torch.zeros(rows.shape, dtype=torch.bool)
    for row, span in enumerate(spans):
        relevant[row, span] = True
    (beta, _), _ = engine.decompose(rows, relevant_positions=relevant, columns=torch.tensor([good_id, bad_id]))
    cdt = (beta[:, -1, 0] - beta[:, -1, 1]).tolist()
    full_logits = model.logits(ids[None], positions="last")[0, -1]
    full = float(full_logits[good_id] - full_logits[bad_id])
    occlusion = []
    for index in range(len(words)):
        rest = " ".join(w for i, w in enumerate(words) if i != index)
        logits = model.logits(model.encode(rest), positions="last")[0, -1]
        occlusion.append(full - float(logits[good_id] - logits[bad_id]))
    return TokenRelevance(words, cdt, occlusion, full)
