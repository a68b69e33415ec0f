"""The copy-paste score and the ROUGE-1 gate.

A copy event of query head (l, h) at answer step t: the head's argmax attention key j* lies inside the
needle's answer span [s, e) and the prompt token there is the token being generated (`P[j*] == w_t`);
`_copy_counts` counts events and distinct copied positions per head from the argmax keys of every step.
`rouge1` decides whether a sample retrieved the answer at all (only those samples are scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyses.retrieval.config import RetrievalError
from probe.models import LoadedModel

_SCORERS: dict[bool, Any] = {}


def rouge1(answer: str, response: str, stem: bool = True) -> float:
    """ROUGE-1 recall of `answer`'s words in `response`, by Google's `rouge_score` package, which the
    authors' code calls (`RougeScorer(['rouge1', ...], use_stemmer=True)`): lowercased alphanumeric words,
    clipped counts, and with `stem` nltk's Porter stemmer on words longer than 3 letters ("painting" and
    "paints" both match "paint"). `stem=False` is the plain word match (`haystack.rouge1_recall`)."""
    if not answer.strip():
        raise RetrievalError("ROUGE-1 recall needs a non-empty answer.")
    if stem not in _SCORERS:
        try:
            from rouge_score import rouge_scorer
        except ImportError as error:  # a dependency of the project: only a broken install lacks it
            raise RetrievalError("The ROUGE-1 gate needs the `rouge-score` package: pip install rouge-score") from error
        _SCORERS[stem] = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)
    return float(_SCORERS[stem].score(answer, response)["rouge1"].recall)


@dataclass
class SampleTrace:
    """One sample's greedy answer and, per head, its copy events (answer steps where it copied)."""

    answer_ids: list[int]
    response: str
    events: torch.Tensor  # [L, H] number of copy events
    unique: torch.Tensor  # [L, H] distinct answer-span positions copied
    argmax: torch.Tensor  # [L, H, T] argmax key position per answer step


class _TokenText:
    """Decoded, whitespace-stripped token strings (for `match='text'`), cached per id."""

    def __init__(self, model: LoadedModel) -> None:
        self.model, self.cache = model, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.model.tokenizer.decode([token]).strip()
        return self.cache[token]


def _copy_counts(argmax: torch.Tensor, prompt_ids: Sequence[int], answer: Sequence[int], span: tuple[int, int],
                 match: str, text: _TokenText | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Events and unique copied positions per head from the argmax keys `[L, H, T]`."""
    n_layers, n_heads, n_steps = argmax.shape
    start, stop = span
    inside = (argmax >= start) & (argmax < stop)
    ids = torch.tensor(list(prompt_ids), dtype=torch.long)
    clipped = argmax.clamp(max=len(ids) - 1)
    copied_ids = ids[clipped]
    generated = torch.tensor(list(answer)[:n_steps], dtype=torch.long)
    if match == "id":
        same = copied_ids == generated.view(1, 1, -1)
    else:
        if text is None:
            raise RetrievalError("match='text' needs the token decoder.")
        same = torch.zeros_like(inside)
        for index in inside.nonzero().tolist():
            layer, head, step = index
            word = text(int(generated[step]))
            same[layer, head, step] = bool(word) and text(int(copied_ids[layer, head, step])) == word
    event = inside & same
    events = event.sum(-1)
    unique = torch.zeros(n_layers, n_heads, dtype=torch.long)
    for layer, head in (events > 0).nonzero().tolist():
        unique[layer, head] = len(set(argmax[layer, head][event[layer, head]].tolist()))
    return events, unique

