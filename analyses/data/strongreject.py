"""StrongREJECT forbidden prompts (the pinned `strongreject` asset) and seeded, stratified splits.

The organism is trained on one part and every safety number is measured on the other, so the
split must be reproducible (seeded) and keep each category's share (stratified): otherwise a
held-out set could, by chance, hold mostly one kind of request.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from analyses.data.harmless import BORDERLINE_HARMLESS_PROMPTS, HARMLESS_PROMPTS
from probe import assets
from probe.errors import ProbeError

T = TypeVar("T")

DEFAULT_HELD_OUT = 0.3
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ForbiddenPrompt:
    """One StrongREJECT row."""

    category: str
    source: str
    prompt: str


def load_strongreject() -> list[ForbiddenPrompt]:
    """All 313 StrongREJECT prompts in file order (raises `AssetMissingError` naming `probe fetch`)."""
    path = assets.asset_file("strongreject")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "forbidden_prompt" not in rows[0]:
        raise ProbeError(f"{path} does not look like the StrongREJECT CSV (no forbidden_prompt column).")
    return [ForbiddenPrompt(r["category"].strip(), r["source"].strip(), r["forbidden_prompt"].strip())
            for r in rows if r["forbidden_prompt"].strip()]


def stratified_split(items: Sequence[T], stratum: Callable[[T], str], held_out: float = DEFAULT_HELD_OUT,
                     seed: int = DEFAULT_SEED) -> tuple[list[T], list[T]]:
    """(train, held_out): each stratum shuffled with `seed`, `round(held_out * n)` of it held out.

    Order inside each part follows the original order, so the split depends only on the seed.
    """
    if not 0.0 < held_out < 1.0:
        raise ProbeError(f"held_out must be a fraction in (0, 1), got {held_out}.")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[stratum(item)].append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for name in sorted(groups):
        indices = list(groups[name])
        rng.shuffle(indices)
        held.update(indices[: round(held_out * len(indices))])
    train = [item for i, item in enumerate(items) if i not in held]
    test = [item for i, item in enumerate(items) if i in held]
    return train, test


def harmful_split(held_out: float = DEFAULT_HELD_OUT, seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """StrongREJECT prompts split by category: (train, held_out) texts."""
    train, test = stratified_split(load_strongreject(), lambda p: p.category, held_out, seed)
    return [p.prompt for p in train], [p.prompt for p in test]


def harmless_split(held_out: float = DEFAULT_HELD_OUT, seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """The project's harmless prompts split the same way; strata = everyday vs borderline wording."""
    borderline = set(BORDERLINE_HARMLESS_PROMPTS)
    return stratified_split(list(HARMLESS_PROMPTS), lambda p: "borderline" if p in borderline else "everyday",
                            held_out, seed)


def categories_of(prompts: Sequence[str]) -> dict[str, str]:
    """Category of each StrongREJECT prompt text (for per-category reporting)."""
    by_text = {p.prompt: p.category for p in load_strongreject()}
    return {text: by_text.get(text, "?") for text in prompts}
