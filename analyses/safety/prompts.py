"""The exact prompt text a model sees (its chat template or a fixed frame) and its token ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analyses.safety.errors import SafetyError
from probe.models import LoadedModel

TEMPLATES: dict[str, str] = {
    # The paper's Sahara/generation format (App. B.1), one variant only, stored with every result.
    "paper": "## Query:{query}\n## Answer:",
    # For models without a chat template (base models): a plain question/answer frame.
    "plain": "Question: {query}\nAnswer:",
}


def render_prompt(model: LoadedModel, query: str, template: str = "chat", system: str | None = None) -> str:
    """The exact text given to the model: its chat template, or one of TEMPLATES."""
    if template == "chat":
        if not model.chat_template:
            raise SafetyError(f"{model.spec} has no chat template. Use template='plain' "
                              f"({TEMPLATES['plain']!r}) or template='paper' ({TEMPLATES['paper']!r}).")
        return model.chat_prompt(query, system=system)
    if template not in TEMPLATES:
        raise SafetyError(f"Unknown template {template!r}; choose chat, {', '.join(TEMPLATES)}.")
    return TEMPLATES[template].format(query=query)


def encode_prompts(model: LoadedModel, queries: Sequence[str], template: str = "chat",
                   system: str | None = None, reserve: int = 0) -> list[torch.Tensor]:
    """Token ids `[1, T]` of each rendered query; clear errors for an empty set or a too-long prompt.

    `reserve` tokens are kept free for generation.
    """
    if not queries:
        raise SafetyError("The prompt set is empty: Ships and Sahara need at least one harmful prompt.")
    encoded = []
    for query in queries:
        if not query.strip():
            raise SafetyError("An empty prompt was given; remove it from the prompt set.")
        ids = model.encode(render_prompt(model, query, template, system), add_special_tokens=template != "chat")
        model.check_fits(ids.shape[-1] + reserve)
        encoded.append(ids)
    return encoded
