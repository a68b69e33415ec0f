"""Chat prompts and the model's own greedy answers: the harmless targets and the refusal judge's input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from probe.generation import greedy_continuations
from probe.prompting import chat_prompt


PLAIN_TEMPLATE = "Question: {query}\nAnswer:"


def chat_text(tokenizer: Any, user: str) -> str:
    """The model's chat template for one user turn (SmolLM2 inserts its default system prompt).

    A tokenizer without a chat template (tiny test models, base models) gets PLAIN_TEMPLATE.
    """
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_TEMPLATE.format(query=user)
    return chat_prompt(tokenizer, user)


@torch.no_grad()
def greedy_answers(hf_model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (token ids, cut at the end-of-turn token) of chat prompts, batched.

    Left padding keeps every prompt's last token at the end of the row; hooks on the bridged
    modules (interventions) are in effect when `hf_model` belongs to a `LoadedModel`.
    """
    return greedy_continuations(hf_model, tokenizer, [chat_text(tokenizer, p) for p in prompts],
                                max_new_tokens, batch_size)
