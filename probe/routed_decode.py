"""`LoadedModel.generate`'s route: one prompt's greedy decode on the fused path where the route decision
(`probe.routing.fused_reason`) says that is exact, else through the bridge's hooks.

Both paths run `probe.generation.greedy_decode` with a full KV cache; this module sits above
`probe.generation` (which itself runs its batched decodes inside `probe.routing.on_fused_path`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import probe.fused as fused_path
from probe import prompting
from probe.errors import ProbeError
from probe.generation import greedy_decode
from probe.head_ops import Intervention
from probe.loaded import LoadedModel
from probe.routing import routed


@torch.no_grad()
def fused_generate(model: LoadedModel, ids: torch.Tensor, max_new_tokens: int = 16,
                   interventions: Sequence[Intervention] = (), stop_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Greedy continuation `[1, n_new]` on the fused path, as `LoadedModel.generate` does on the bridge (full
    `DynamicCache`, stop after an EOS/stop token, not included); interventions' positions are absolute."""
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ProbeError("fused_generate() takes one prompt; loop over prompts.")
    model.check_fits(ids.shape[-1] + max_new_tokens)
    stops = set(stop_ids or ()) | prompting.stop_ids(model, "eos")
    with fused_path.fused(model, interventions):
        return greedy_decode(model.hf_model, ids, max_new_tokens, stops)


def generate(model: LoadedModel, ids: torch.Tensor, max_new_tokens: int,
             stop_ids: Sequence[int] | None) -> torch.Tensor:
    """`fused_generate` where exact, else `greedy_decode` on the wrapped HF model (whose modules the bridge
    replaced, so every hook fires); stops after an EOS/stop token (not included)."""
    stops = set(stop_ids or ()) | prompting.stop_ids(model, "eos")
    return routed(model, lambda interventions: fused_generate(model, ids, max_new_tokens, interventions, stop_ids),
                  lambda: greedy_decode(model.hf_model, ids, max_new_tokens, stops))
