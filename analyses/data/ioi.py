"""Indirect-object identification (IOI) prompts, written by the project.

"When Mary and John went to the store, John gave a drink to" → " Mary": the model must name the
indirect object (IO, mentioned once) rather than the subject (S, mentioned twice). The metric is
the logit difference logit(IO) − logit(S) at the last position.

Each template keeps its token length fixed when every name is one token (with its leading space),
so prompts of one template can be batched without padding and compared position by position.
The mean-source ("ABC") prompts put three different names in the three slots: same syntax, no
repeated name, so their mean activations carry the template but not the IO/S information.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common first names; only those that are a single token (with a leading space) in the model's
# tokenizer are used (`single_token_names`).
NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "Paul", "Kate", "Mark", "Lucy", "James", "Sarah",
    "David", "Emma", "Michael", "Laura", "Peter", "Linda", "George", "Susan", "Daniel", "Rachel",
    "Steven", "Helen", "Richard", "Karen", "Chris", "Amy", "Jack", "Emily", "Robert", "Jane", "Frank",
    "Grace", "Henry", "Rose", "Adam", "Lisa", "Sam", "Julia", "Eric", "Nancy", "Kevin", "Sophie", "Ryan",
    "Claire", "Brian", "Diana", "Jason", "Alex", "Ben", "Max", "Dan", "Joe", "Tim", "Ann", "Bill", "Jim",
)

# {A} and {B} are the two names introduced first; {C} is the name of the giver (S in IOI prompts).
TEMPLATES: tuple[str, ...] = (
    "When{A} and{B} went to the store,{C} gave a drink to",
    "When{A} and{B} went to the park,{C} handed a ball to",
    "After{A} and{B} had lunch at the cafe,{C} gave a sandwich to",
    "While{A} and{B} were working at the office,{C} sent an email to",
    "Then{A} and{B} had a long talk, and afterwards{C} said goodbye to",
)


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt and its answer; `template` indexes TEMPLATES, `order` is ABBA or BABA."""

    text: str
    io: str  # with leading space
    s: str  # with leading space
    template: int
    order: str


def single_token_names(tokenizer, names: tuple[str, ...] = NAMES) -> list[str]:
    """Names (with a leading space) that the tokenizer encodes as exactly one token."""
    found = []
    for name in names:
        ids = tokenizer(" " + name, add_special_tokens=False).input_ids
        if len(ids) == 1:
            found.append(" " + name)
    return found


def ioi_prompts(tokenizer, n: int, seed: int = 0, templates: tuple[int, ...] | None = None,
                orders: tuple[str, ...] = ("ABBA", "BABA")) -> list[IOIPrompt]:
    """`n` seeded IOI prompts cycling over templates and the two name orders."""
    names = single_token_names(tokenizer)
    if len(names) < 3:
        raise ValueError("The tokenizer has fewer than 3 single-token names; IOI cannot be built.")
    rng = random.Random(seed)
    chosen = list(templates) if templates is not None else list(range(len(TEMPLATES)))
    prompts = []
    for index in range(n):
        template = chosen[index % len(chosen)]
        order = orders[(index // len(chosen)) % len(orders)]
        io, s = rng.sample(names, 2)
        a, b = (io, s) if order == "ABBA" else (s, io)
        text = TEMPLATES[template].format(A=a, B=b, C=s)
        prompts.append(IOIPrompt(text, io, s, template, order))
    return prompts


def abc_prompts(tokenizer, n: int, seed: int = 1, templates: tuple[int, ...] | None = None) -> list[str]:
    """Mean-source prompts: three distinct names in the three slots (no repeated name)."""
    names = single_token_names(tokenizer)
    rng = random.Random(seed)
    chosen = list(templates) if templates is not None else list(range(len(TEMPLATES)))
    texts = []
    for index in range(n):
        a, b, c = rng.sample(names, 3)
        texts.append(TEMPLATES[chosen[index % len(chosen)]].format(A=a, B=b, C=c))
    return texts
