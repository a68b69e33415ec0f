"""Succession tasks (ordinal sequences) for the successor-heads analysis, mapped onto a tokenizer.

Written by the project (Gould et al. 2023 name the task classes but have released no data set).
Eight task classes, each an ordered list of base forms with their natural index (used for the
index-mod-10 analyses): numbers 0..N (index = value), number words zero..twenty (index = value),
ordinal words first..tenth (1..10), days, day prefixes (Monday = 1), months, month prefixes
(January = 1), letters (a = 1).

Each task is expanded into four surface variants (bare, Capitalised, leading space, leading space +
Capitalised). An item is kept only if it is one token for the tokenizer at hand; a variant whose
tokens are identical to an earlier variant's (a word tokenizer ignores the space; digits have no
case) is dropped as a duplicate; a task variant with fewer than `min_items` single-token items is
dropped. Every drop is logged in `TaskSet.dropped`, so the mapping per tokenizer is explicit.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass, field

from probe.errors import ProbeError


class NoNumberTokensError(ProbeError):
    """The tokenizer has fewer than `min_items` single-token numbers: the number task cannot be built."""


NUMBER_WORDS: tuple[str, ...] = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())
ORDINAL_WORDS: tuple[str, ...] = tuple(
    "first second third fourth fifth sixth seventh eighth ninth tenth".split())
DAYS: tuple[str, ...] = tuple(d.lower() for d in calendar.day_name)  # monday .. sunday (locale C)
MONTHS: tuple[str, ...] = tuple(m.lower() for m in calendar.month_name[1:])
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")

# Variant id -> how to write a base form.
VARIANTS: dict[str, str] = {"bare": "{}", "cap": "{Cap}", "space": " {}", "space_cap": " {Cap}"}


@dataclass(frozen=True)
class Task:
    """An ordered sequence; `cyclic` tasks may wrap around (Sunday -> Monday) when asked."""

    name: str
    items: tuple[str, ...]
    indices: tuple[int, ...]
    cyclic: bool = False


def base_tasks(number_max: int = 200) -> tuple[Task, ...]:
    """The eight task classes, in base (lower-case, no space) form."""
    if number_max < 2:
        raise ProbeError(f"number_max must be at least 2, not {number_max}.")
    return (
        Task("numbers", tuple(str(i) for i in range(number_max + 1)), tuple(range(number_max + 1))),
        Task("number_words", NUMBER_WORDS, tuple(range(len(NUMBER_WORDS)))),
        Task("ordinals", ORDINAL_WORDS, tuple(range(1, len(ORDINAL_WORDS) + 1))),
        Task("days", DAYS, tuple(range(1, 8)), cyclic=True),
        Task("day_prefixes", tuple(d[:3] for d in DAYS), tuple(range(1, 8)), cyclic=True),
        Task("months", MONTHS, tuple(range(1, 13)), cyclic=True),
        Task("month_prefixes", tuple(m[:3] for m in MONTHS), tuple(range(1, 13)), cyclic=True),
        Task("letters", LETTERS, tuple(range(1, 27))),
    )


TASK_NAMES: tuple[str, ...] = tuple(t.name for t in base_tasks())


def surface(base: str, variant: str) -> str:
    """The text of `base` in `variant` (e.g. 'monday', 'space_cap' -> ' Monday')."""
    return VARIANTS[variant].format(base, Cap=base[:1].upper() + base[1:])


@dataclass
class TokenTask:
    """One task variant on one tokenizer: kept items, their token ids, indices and successors.

    `successor[i]` is the position (in this variant's kept items) of item i's successor, or -1
    when it has none (last item without wrap-around, or the successor is not a single token).
    """

    task: str
    variant: str
    texts: list[str]
    token_ids: list[int]
    indices: list[int]
    successor: list[int]

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}"

    @property
    def n_scored(self) -> int:
        return sum(1 for s in self.successor if s >= 0)


@dataclass
class TaskSet:
    tasks: list[TokenTask]
    dropped: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.tasks))

    def mapping(self) -> list[dict[str, object]]:
        """The token mapping as plain data (for results and logs)."""
        return [{"task": t.task, "variant": t.variant, "texts": t.texts, "token_ids": t.token_ids,
                 "indices": t.indices} for t in self.tasks]


def single_token_id(tokenizer: object, text: str) -> int | None:
    """The id of `text` if the tokenizer encodes it as exactly one known token, else None."""
    ids = tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])


def build_tasks(tokenizer: object, number_max: int = 200, wrap_around: bool = False, min_items: int = 3,
                tasks: Sequence[str] | None = None, variants: Sequence[str] | None = None,
                require_numbers: bool = True) -> TaskSet:
    """Map the succession tasks onto `tokenizer`, keeping single-token items and logging every drop.

    Raises `NoNumberTokensError` if `require_numbers` and no number-task variant survives.
    """
    wanted = list(tasks) if tasks else list(TASK_NAMES)
    unknown = [t for t in wanted if t not in TASK_NAMES]
    if unknown:
        raise ProbeError(f"Unknown succession task(s) {unknown}; choose from {', '.join(TASK_NAMES)}.")
    variant_ids = list(variants) if variants else list(VARIANTS)
    bad = [v for v in variant_ids if v not in VARIANTS]
    if bad:
        raise ProbeError(f"Unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}.")
    if min_items < 2:
        raise ProbeError("min_items must be at least 2 (a successor needs two items).")

    kept: list[TokenTask] = []
    dropped: list[str] = []
    for task in base_tasks(number_max):
        if task.name not in wanted:
            continue
        seen_ids: dict[tuple[int, ...], str] = {}
        for variant in variant_ids:
            texts, ids, positions, missing = [], [], [], []
            for position, base in enumerate(task.items):
                text = surface(base, variant)
                token = single_token_id(tokenizer, text)
                if token is None:
                    missing.append(text)
                else:
                    texts.append(text)
                    ids.append(token)
                    positions.append(position)
            where = f"{task.name}/{variant}"
            if missing:
                shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
                dropped.append(f"{where}: {len(missing)} of {len(task.items)} items are not single tokens ({shown})")
            if len(set(ids)) != len(ids):
                dropped.append(f"{where}: dropped, two items share one token id")
                continue
            if tuple(ids) in seen_ids and ids:
                dropped.append(f"{where}: dropped, same tokens as {task.name}/{seen_ids[tuple(ids)]}")
                continue
            if len(ids) < min_items:
                dropped.append(f"{where}: dropped, only {len(ids)} single-token items (< {min_items})")
                continue
            seen_ids[tuple(ids)] = variant
            at = {p: i for i, p in enumerate(positions)}
            successor = []
            for p in positions:
                nxt = p + 1
                if nxt == len(task.items) and wrap_around and task.cyclic:
                    nxt = 0
                successor.append(at.get(nxt, -1))
            kept.append(TokenTask(task.name, variant, texts, ids, [task.indices[p] for p in positions], successor))
    if require_numbers and "numbers" in wanted and not any(t.task == "numbers" for t in kept):
        raise NoNumberTokensError(
            f"The tokenizer has no number task: fewer than {min_items} of the numbers 0..{number_max} are "
            "single tokens in every variant. The successor score needs number tokens; pass "
            "require_numbers=False (or leave 'numbers' out of tasks) to score the other tasks only.")
    if not kept:
        raise ProbeError("No succession task has enough single-token items for this tokenizer.")
    return TaskSet(kept, dropped)
