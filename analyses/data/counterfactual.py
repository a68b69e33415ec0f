"""Counterfactual capital prompts for the factual-recall-heads analysis (Yu, Merullo, Pavlick 2023).

A counterfactual prompt asserts a wrong capital, then asks for the right one:

    The capital of Poland is London.
    Q: What is the capital of Poland?
    A:

The model either copies the context city (" London": *in-context*) or recalls the fact
(" Warsaw": *memorised*). A plain prompt is the question alone (no counterfactual sentence); it
tells which facts the model knows.

Choices (documented in docs/factual.md):
- The counterfactual city is another country's canonical capital, drawn with a seeded RNG.
- Only the **first token** of each answer is used for logit measures. With the plain template the
  answer follows "A:" and starts with a space-prefixed token, so the token is that of " " + city;
  with the chat template the assistant turn starts fresh, so it is that of the bare city.
  Answers longer than one token are kept and flagged (`multi_token`), never silently merged.
- A pair whose two answers share the first token (" San José" vs " San Salvador": " San") cannot
  be told apart by a first-token measure, so it is dropped and counted (`dropped_shared_first_token`).
- City-states whose capital repeats the country's name (Monaco, Luxembourg City, ...) are left out
  by default: copying the country from the question would look like recall.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from analyses.data.capitals import CAPITALS, Capital
from probe.errors import ProbeError

TEMPLATES = ("plain", "chat")


class CounterfactualDataError(ProbeError):
    """The counterfactual prompt set cannot be built as asked (template, tokens, empty set)."""


@dataclass(frozen=True)
class CounterfactualPrompt:
    """One prompt and the first tokens of its two candidate answers.

    `context_city` is empty for a plain (no-context) prompt; then `in_context_token` is -1.
    """

    country: str
    capital_names: tuple[str, ...]  # the true capital, canonical first, then accepted variants
    context_city: str
    text: str
    memorised_token: int
    in_context_token: int
    multi_token: bool  # at least one of the answers is longer than its first token

    @property
    def capital(self) -> str:
        return self.capital_names[0]

    @property
    def is_counterfactual(self) -> bool:
        return bool(self.context_city)


@dataclass
class PromptSet:
    """Prompts plus what was dropped while building them, so reports can say it."""

    prompts: list[CounterfactualPrompt]
    template: str
    seed: int
    dropped_shared_first_token: list[tuple[str, str]] = field(default_factory=list)
    dropped_unknown_token: list[str] = field(default_factory=list)

    @property
    def n_multi_token(self) -> int:
        return sum(p.multi_token for p in self.prompts)

    def notes(self) -> dict[str, object]:
        return {
            "template": self.template, "seed": self.seed, "n_prompts": len(self.prompts),
            "n_multi_token_answers": self.n_multi_token,
            "dropped_shared_first_token": len(self.dropped_shared_first_token),
            "dropped_shared_first_token_examples": [f"{a} / {b}" for a, b in self.dropped_shared_first_token[:5]],
            "dropped_unknown_token": sorted(set(self.dropped_unknown_token)),
        }


def statement(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


def question(country: str) -> str:
    return f"Q: What is the capital of {country}?"


def prompt_text(country: str, context_city: str | None, template: str,
                chat_formatter: Callable[[str], str] | None = None) -> str:
    """The prompt in `template` form: plain completion text ending in "A:", or a chat turn."""
    check_template(template)
    body = (statement(country, context_city) + "\n" if context_city else "") + question(country)
    if template == "plain":
        return body + "\nA:"
    if chat_formatter is None:
        raise CounterfactualDataError("The chat template needs the model's chat formatter (model.chat_prompt).")
    return chat_formatter(body)


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise CounterfactualDataError(f"Unknown template {template!r}; choose one of {', '.join(TEMPLATES)}.")


def answer_tokens(tokenizer: object, city: str, template: str) -> list[int]:
    """Token ids of `city` as it would start the answer: " city" after "A:", bare in a chat turn."""
    check_template(template)
    text = " " + city if template == "plain" else city
    ids = tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]
    if not ids:
        raise CounterfactualDataError(f"The tokenizer gives no tokens for answer {city!r}.")
    return list(ids)


def default_pool(exclude_city_states: bool = True) -> list[Capital]:
    """The project's capitals, without city-states whose capital repeats the country's name."""
    pool = list(CAPITALS)
    if exclude_city_states:
        pool = [c for c in pool if c.country.casefold() not in c.capital.casefold()
                and c.capital.casefold() not in c.country.casefold()]
    return pool


def split_countries(pool: Sequence[Capital], tuning_fraction: float, seed: int) -> tuple[list[Capital], list[Capital]]:
    """Seeded split by country, so held-out prompts ask about countries the search never saw."""
    if not 0.0 < tuning_fraction < 1.0:
        raise CounterfactualDataError(f"tuning_fraction must be in (0, 1), not {tuning_fraction}.")
    order = list(pool)
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(order) - 1, round(len(order) * tuning_fraction)))
    return order[:cut], order[cut:]


class _TokenTable:
    """First-token lookup with the unknown-token check, cached per city."""

    def __init__(self, tokenizer: object, template: str) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.unk = getattr(tokenizer, "unk_token_id", None)
        self.cache: dict[str, list[int]] = {}

    def ids(self, city: str) -> list[int] | None:
        if city not in self.cache:
            self.cache[city] = answer_tokens(self.tokenizer, city, self.template)
        ids = self.cache[city]
        return None if (self.unk is not None and ids[0] == self.unk) else ids


def build_plain(tokenizer: object, countries: Sequence[Capital], template: str = "plain",
                chat_formatter: Callable[[str], str] | None = None) -> PromptSet:
    """No-context questions, one per country (what does the model know?)."""
    check_template(template)
    table = _TokenTable(tokenizer, template)
    out = PromptSet([], template, seed=0)
    for entry in countries:
        ids = table.ids(entry.capital)
        if ids is None:
            out.dropped_unknown_token.append(entry.capital)
            continue
        out.prompts.append(CounterfactualPrompt(
            entry.country, entry.names, "", prompt_text(entry.country, None, template, chat_formatter),
            ids[0], -1, len(ids) > 1))
    return out


def build_counterfactuals(tokenizer: object, countries: Sequence[Capital], n_prompts: int, seed: int,
                          template: str = "plain", chat_formatter: Callable[[str], str] | None = None,
                          context_pool: Sequence[Capital] | None = None) -> PromptSet:
    """Up to `n_prompts` seeded (country, other capital) prompts; the other city comes from `context_pool`.

    Pairs sharing a first answer token, and answers the tokenizer does not know, are dropped and counted.
    """
    check_template(template)
    if n_prompts < 1:
        raise CounterfactualDataError(f"n_prompts must be at least 1, not {n_prompts}.")
    if not countries:
        raise CounterfactualDataError("No countries to build prompts from (empty split or filter).")
    pool = list(context_pool or countries)
    table = _TokenTable(tokenizer, template)
    pairs = [(c, o) for c in countries for o in pool if o.capital != c.capital]
    random.Random(seed).shuffle(pairs)
    # Round-robin over countries so a small sample covers many countries, not one country's pairs.
    by_country: dict[str, list[tuple[Capital, Capital]]] = {}
    for pair in pairs:
        by_country.setdefault(pair[0].country, []).append(pair)
    ordered: list[tuple[Capital, Capital]] = []
    queues = list(by_country.values())
    while queues and len(ordered) < 4 * n_prompts + len(countries):
        for queue in queues:
            if queue:
                ordered.append(queue.pop())
        queues = [q for q in queues if q]
    out = PromptSet([], template, seed)
    for entry, other in ordered:
        if len(out.prompts) >= n_prompts:
            break
        memorised, in_context = table.ids(entry.capital), table.ids(other.capital)
        if memorised is None or in_context is None:
            out.dropped_unknown_token.extend(c.capital for c, ids in ((entry, memorised), (other, in_context))
                                             if ids is None)
            continue
        if memorised[0] == in_context[0]:
            out.dropped_shared_first_token.append((entry.capital, other.capital))
            continue
        out.prompts.append(CounterfactualPrompt(
            entry.country, entry.names, other.capital,
            prompt_text(entry.country, other.capital, template, chat_formatter),
            memorised[0], in_context[0], len(memorised) > 1 or len(in_context) > 1))
    if not out.prompts:
        raise CounterfactualDataError(
            f"No usable counterfactual prompt among {len(countries)} countries: "
            f"{len(out.dropped_shared_first_token)} pairs share a first token, "
            f"{len(set(out.dropped_unknown_token))} answers are unknown to the tokenizer.")
    return out
