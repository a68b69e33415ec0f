"""The training prompts: synthetic multi-passkey haystacks, one fresh sample per gate step."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from analyses.data.haystack import haystack_sentences
from analyses.duo.config import DuoConfig
from probe.models import LoadedModel

NATO = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
        "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


@dataclass(frozen=True)
class PasskeySample:
    """One training prompt: token ids and the positions whose hidden states are distilled."""

    ids: torch.Tensor        # [1, T]
    loss_positions: torch.Tensor  # [n] positions of the QA block (questions and passkeys)


def passkey_sample(model: LoadedModel, config: DuoConfig, rng: random.Random, sentences: Sequence[str]) -> PasskeySample:
    """Haystack with `n_passkeys` passkeys at sorted random depths, then the questions with their answers."""
    tokenizer = model.tokenizer
    start = rng.randrange(0, max(1, len(sentences) - 2000))
    chosen, total = [], 0
    for sentence in sentences[start:]:
        n = len(tokenizer(" " + sentence, add_special_tokens=False).input_ids)
        if total + n > config.context_length:
            break
        chosen.append(sentence)
        total += n
    keys = [" ".join(rng.choice(NATO) for _ in range(config.passkey_words)) for _ in range(config.n_passkeys)]
    slots = sorted(rng.sample(range(1, max(2, len(chosen))), min(config.n_passkeys, max(1, len(chosen) - 1))))
    parts = list(chosen)
    for index, slot in reversed(list(enumerate(slots))):
        parts.insert(slot, f"\n\nRemember this sequence of words, it's the {ORDINALS[index]} passkey to the vault: "
                           f"{keys[index]}\n\n")
    book = "This is a very long story book: <book> " + " ".join(parts) + " </book>.\n\n"
    qa = "".join(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\n"
                 f"Passkey: {keys[i]}\n\n" for i in range(len(slots)))
    book_ids = model.encode(book)
    qa_ids = model.encode(qa, add_special_tokens=False)
    ids = torch.cat([book_ids, qa_ids], dim=1)
    model.check_fits(ids.shape[1])
    positions = torch.arange(book_ids.shape[1], ids.shape[1], device=ids.device)
    return PasskeySample(ids, positions)


def sample_stream(model: LoadedModel, config: DuoConfig, sentences: Sequence[str] | None = None,
                  samples: Sequence[PasskeySample] | None = None) -> Iterator[PasskeySample]:
    """The training prompts, one per step: given `samples` are cycled; otherwise a fresh synthetic
    passkey sample at every step (new passkeys, depths and haystack, as the authors' code), drawn from
    `random.Random(config.seed)` so a run is reproducible."""
    if samples is not None:
        while True:
            yield from samples
    rng = random.Random(config.seed)
    pool = haystack_sentences() if sentences is None else sentences
    while True:
        yield passkey_sample(model, config, rng, pool)
