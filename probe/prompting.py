"""How a prompt is rendered for a chat model and where a greedy answer stops, in one place.

`chat_prompt` applies a tokenizer's chat template to one user turn (after an optional system turn),
ready for the assistant's answer: the models' own formatter, the NIAH prompts and the organism's
training and evaluation prompts all render through it. `stop_ids` gives the tokens a decode stops at
under a named policy:

- `"eos"`: the tokenizer's end-of-sequence id (no id when it has none): generation, the fused path,
  the analyzers' batched answers;
- `"special_and_newline"`: every special id (end of turn included) and any token whose decoded text
  holds a line break: retrieval's answers, as the authors' decode loop stops at a newline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from probe.errors import ProbeError

STOP_POLICIES = ("eos", "special_and_newline")


class StopIds(frozenset[int]):
    """The token ids a greedy decode stops at; with `newline_tokenizer` also any token whose text (decoded
    by it) holds a line break. Membership (`token in stops`) is the whole stop rule."""

    newline_tokenizer: Any

    def __new__(cls, ids: Iterable[int] = (), newline_tokenizer: Any = None) -> StopIds:
        stops = super().__new__(cls, ids)
        stops.newline_tokenizer = newline_tokenizer
        return stops

    def __contains__(self, token: object) -> bool:
        if frozenset.__contains__(self, token):
            return True
        return self.newline_tokenizer is not None and "\n" in self.newline_tokenizer.decode([token])


def stop_ids(model_or_tokenizer: Any, policy: str = "eos") -> StopIds:
    """The stop tokens of `policy` (one of `STOP_POLICIES`) for a `LoadedModel` or a tokenizer."""
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if policy == "eos":
        return StopIds(() if eos is None else (int(eos),))
    if policy == "special_and_newline":
        ids = set(tokenizer.all_special_ids or ())
        if eos is not None:
            ids.add(int(eos))
        return StopIds(ids, newline_tokenizer=tokenizer)
    raise ProbeError(f"Unknown stop policy {policy!r}; choose one of {', '.join(STOP_POLICIES)}.")


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The tokenizer's chat template around one user turn (after a system turn when `system` is given),
    ending where the assistant's answer begins. The caller checks that the tokenizer has a template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


__all__ = ["STOP_POLICIES", "StopIds", "chat_prompt", "stop_ids"]
