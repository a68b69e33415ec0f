"""The detection samples: one greedy answer per NIAH prompt and, per step, every head's argmax key.

`fast_sample` is the fast path: one greedy decode with a KV cache; the prefill runs unhooked through the
HF model's own SDPA attention (no L x L scores at all); each decode step keeps, per layer and head, only
the argmax key of its own attention row (the fused kernel's q and k through `probe.fused.kernel_pattern`,
else `hook_pattern` of the one new query: `[H, N]`, already with the family's GQA expansion, scaling,
soft-cap, QK-norm, partial rotary, causal and sliding-window masks). Memory is linear in the context,
never an L x L pattern, and nothing is family-specific, so packed-qkv families (Phi-3, GPT-NeoX), whose
bridge never fires `hook_rot_q`, run too. `reference_sample` is the slow reference, an oracle kept
apart from the decode stepper: no cache, a full forward per decode step, the argmax read from the full
`hook_pattern`.
"""

from __future__ import annotations

from typing import Any

import torch

from analyses.data.haystack import NiahSample
from analyses.retrieval.config import RetrievalError
from analyses.retrieval.geometry import LayerGeometry
from analyses.retrieval.scoring import SampleTrace, _copy_counts, _TokenText
from probe.architecture import architecture
from probe.fused import fused, kernel_pattern
from probe.fused_checks import FusedPathError
from probe.fused_prefill import native_attention
from probe.generation import greedy_steps, growing_cache
from probe.models import LoadedModel
from probe.prompting import stop_ids
from probe.routing import fused_reason


@torch.no_grad()
def fast_sample(model: LoadedModel, sample: NiahSample, max_new_tokens: int, match: str = "id",
                geometry: list[LayerGeometry] | None = None, stop: bool = True) -> SampleTrace:
    """Greedy answer + copy events from each decode step's own attention row.

    The prefill of `prompt[:-1]` runs with no hooks and, where the model allows it, through the HF
    attention modules with SDPA (`probe.fused_prefill.native_attention`): no `[H, N, N]` score tensor, so
    it costs about one linear-memory forward; its keys and values go into a full cache (`growing_cache`:
    every position of every layer, not a sliding-window cache). Only the decode steps (`probe.generation.greedy_steps`)
    run observed: each keeps the argmax key of every head's attention row (`[H]` per layer and step), the
    very quantity the reference reads from full forwards. `geometry` is not used (the rows come from the
    model's own attention). `stop=False` decodes exactly `max_new_tokens` (benchmarks on random weights)."""
    architecture(model)  # a family without attention (state-space models) is a clear MissingComponentError
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    rows: list[list[torch.Tensor]] = [[] for _ in range(model.n_layers)]

    def keep_argmax(pattern: torch.Tensor, hook: Any) -> None:
        rows[int(hook.name.split(".")[1])].append(pattern[0, :, -1, :].argmax(-1).cpu())

    def observe(layer: int) -> Any:
        def keep(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
            rows[layer].append(kernel_pattern(query[:, :, -1:], key, mask, kwargs)[0, :, -1, :].argmax(-1).cpu())
        return keep

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep_argmax) for layer in range(model.n_layers)]
    # the authors' code stops at a newline; end-of-turn and other special tokens end an answer too
    stops = stop_ids(model, "special_and_newline") if stop else frozenset()

    def decode(cache: Any) -> list[int]:  # from the last prompt token on; no forward past the last answer token
        return greedy_steps(model.hf_model, cache, max_new_tokens, stops, model.device, tokens=ids[:, -1:])[0]

    def prefilled() -> Any:
        cache = growing_cache()
        if n > 1:
            with native_attention(model):
                model.hf_model(ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    with model.lock:
        answer = None
        if fused_reason(model) is None:  # each step's attention row from the kernel's own q and k (no pattern)
            cache = prefilled()
            try:
                with fused(model, observers={layer: observe(layer) for layer in range(model.n_layers)}):
                    answer = decode(cache)
            except FusedPathError:  # this family does not call its kernel through transformers' registry
                for layer_rows in rows:
                    layer_rows.clear()
        if answer is None:
            cache = prefilled()
            with model.bridge.hooks(fwd_hooks=hooks):
                answer = decode(cache)
    n_steps = len(answer)
    argmax = torch.zeros(model.n_layers, model.n_heads, n_steps, dtype=torch.long)
    if n_steps:
        for layer in range(model.n_layers):
            if len(rows[layer]) < n_steps:
                raise RetrievalError(f"{model.spec}: layer {layer}'s attention pattern hook fired "
                                     f"{len(rows[layer])} times in {n_steps} decode steps; the bridge does not "
                                     "expose this family's attention weights.")
            argmax[layer] = torch.stack(rows[layer][:n_steps], dim=-1)
    text = _TokenText(model) if match == "text" else None
    events, unique = _copy_counts(argmax, sample.input_ids, answer, sample.answer_tokens, match, text)
    return SampleTrace(answer, model.decode(answer), events, unique, argmax)


def _cached_keys(cache: Any, layer: int) -> torch.Tensor:
    """One layer's keys `[N, n_kv, d]` from a full `DynamicCache` of batch 1 (stored `[1, n_kv, N, d]`)."""
    return cache.layers[layer].keys[0].transpose(0, 1)


@torch.no_grad()
def reference_sample(model: LoadedModel, sample: NiahSample, max_new_tokens: int, match: str = "id",
                     stop: bool = True) -> SampleTrace:
    """Slow reference: no KV cache, one full forward per decode step; at each step the argmax of the
    last row of every layer's full `hook_pattern` (the model's own attention weights)."""
    ids = sample.ids(model.device)
    n = ids.shape[-1]
    model.check_fits(n + max_new_tokens)
    rows: dict[int, torch.Tensor] = {}

    def keep_last_row(pattern: torch.Tensor, hook: Any) -> None:
        rows[int(hook.name.split(".")[1])] = pattern[0, :, -1, :].argmax(-1).cpu()

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep_last_row) for layer in range(model.n_layers)]
    stops = stop_ids(model, "special_and_newline")
    answer: list[int] = []
    steps: list[torch.Tensor] = []
    sequence = ids
    for _ in range(max_new_tokens):
        with model.bridge.hooks(fwd_hooks=hooks):  # full forward, full patterns; logits of the last row only
            logits = model.hf_model(sequence, use_cache=False, logits_to_keep=1).logits
        next_id = int(logits[0, -1].argmax())
        if stop and next_id in stops:
            break
        answer.append(next_id)
        steps.append(torch.stack([rows[layer] for layer in range(model.n_layers)]))
        if len(answer) == max_new_tokens:
            break
        sequence = torch.cat([sequence, torch.tensor([[next_id]], device=model.device)], dim=1)
    argmax = (torch.stack(steps, dim=-1) if steps
              else torch.zeros(model.n_layers, model.n_heads, 0, dtype=torch.long))
    text = _TokenText(model) if match == "text" else None
    events, unique = _copy_counts(argmax, sample.input_ids, answer, sample.answer_tokens, match, text)
    return SampleTrace(answer, model.decode(answer), events, unique, argmax)


