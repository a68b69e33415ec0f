"""Head addressing: `Head(layer, head)`, parsed from and printed as `L5H3`; `5.3` and `L5H*` parse too.

Heads are query heads. With grouped-query attention several query heads share one key/value head;
the model (`LoadedModel.kv_head_of`) maps one to the other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from probe.errors import HeadError

_LH = re.compile(r"^L(\d+)H(\d+|\*)$", re.IGNORECASE)
_DOT = re.compile(r"^(\d+)\.(\d+|\*)$")


class HasShape(Protocol):
    spec: str
    n_layers: int
    n_heads: int
    n_kv_heads: int


@dataclass(frozen=True, order=True)
class Head:
    """One query head: `layer` and `head` are 0-based."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """Parse one head (`L5H3` or `5.3`); a wildcard needs `parse_heads` and a model."""
        heads = _parse_one(text, None)
        if len(heads) != 1:
            raise HeadError(f"{text!r} names several heads; use parse_heads(text, model).")
        return heads[0]


def _parse_one(text: str, model: HasShape | None) -> list[Head]:
    token = text.strip()
    match = _LH.match(token) or _DOT.match(token)
    if not match:
        raise HeadError(f"Cannot read head {token!r}: write L<layer>H<head> (e.g. L5H3), 5.3, or L5H*.")
    layer = int(match.group(1))
    if match.group(2) == "*":
        if model is None:
            raise HeadError(f"{token!r} needs a model to expand the wildcard.")
        validate_heads([Head(layer, 0)], model)
        return [Head(layer, h) for h in range(model.n_heads)]
    return [Head(layer, int(match.group(2)))]


def parse_heads(text: str | Iterable[str], model: HasShape | None = None) -> list[Head]:
    """Parse a comma/space separated list (`L5H3, 2.1 L7H*`), validate it against `model` if given.

    Order is kept, duplicates removed.
    """
    parts = re.split(r"[,\s]+", text) if isinstance(text, str) else list(text)
    heads: list[Head] = []
    for part in parts:
        if part.strip():
            for head in _parse_one(part, model):
                if head not in heads:
                    heads.append(head)
    if model is not None:
        validate_heads(heads, model)
    return heads


def validate_heads(heads: Iterable[Head], model: HasShape) -> None:
    """Raise `HeadError` naming the model's shape if any head is outside it."""
    for head in heads:
        if not (0 <= head.layer < model.n_layers and 0 <= head.head < model.n_heads):
            raise HeadError(
                f"{head} does not exist in {model.spec}, which has {model.n_layers} layers "
                f"(0-{model.n_layers - 1}) x {model.n_heads} query heads (0-{model.n_heads - 1})."
            )


def format_heads(heads: Iterable[Head]) -> str:
    return ", ".join(str(h) for h in heads)
