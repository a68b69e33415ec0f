"""Greedy generation in left-padded batches: probe's one padded generation path.

Left padding keeps every row's last prompt token at the end of the batch, so one Hugging Face
`generate` call with a KV cache continues all rows at once; the attention mask hides the padding and
the model derives positions from it (rotary and learned positions both see each row from 0), so a
row continues exactly as it would alone (tests/test_generation.py checks this per family).

`greedy_continuations` works on any Hugging Face causal LM (the organism trains a raw one);
`greedy_generate` runs a `LoadedModel` holding its lock, so the interventions attached to it are in effect
for every step: on the fused path (`probe.fused`, the model's SDPA attention, the open `intervene()`
blocks handed over, positions from the cache length) where `model.fused_reason()` says that is exact,
else through the hooks on the bridge's components (which the bridge swapped into the HF modules).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch


def _pad_id(hf_model: Any, tokenizer: Any, stops: Collection[int]) -> int:
    """The id to pad with: the tokenizer's pad, else its eos, else the model config's pad / eos, else a
    stop id, else 0 (padding is masked out, so any id works; a real one keeps embeddings in range)."""
    candidates = [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    for config in (getattr(hf_model, "generation_config", None), getattr(hf_model, "config", None)):
        candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    candidates += sorted(stops)
    for candidate in candidates:
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _default_stops(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}


def _cut(row: list[int], stops: Collection[int]) -> list[int]:
    """The row up to and including its first stop id (generate pads finished rows after it)."""
    for index, token in enumerate(row):
        if token in stops:
            return row[: index + 1]
    return row


@torch.no_grad()
def greedy_continuations(hf_model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 16, add_special_tokens: bool = False,
                         stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids per text, cut after the first stop id, which is kept) of
    already rendered prompt texts, in left-padded batches with a KV cache. `stop_ids` default: the
    tokenizer's eos; an empty collection generates `max_new_tokens` for every row."""
    stops = _default_stops(tokenizer) if stop_ids is None else {int(s) for s in stop_ids}
    pad = _pad_id(hf_model, tokenizer, stops)
    device = next(hf_model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(texts), max(1, batch_size)):
        encoded = [list(tokenizer(t, add_special_tokens=add_special_tokens).input_ids)
                   for t in texts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            if e:
                ids[row, width - len(e):] = torch.tensor(e)
                mask[row, width - len(e):] = 1
        # The model's own generation config may name an eos: with no stop ids asked for, a list that
        # cannot occur (-1) keeps generate from stopping early on it.
        eos = sorted(stops) if stops else [-1]
        generated = hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                                      pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None,
                                      top_k=None)
        for row in generated[:, width:].tolist():
            out.append(_cut(row, stops))
    return out


def greedy_generate(model: Any, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                    add_special_tokens: bool = False, stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """`greedy_continuations` on a `LoadedModel`, holding `model.lock` for all batches: interventions
    attached to the model (`probe.interventions.intervene`) apply, and no other thread's hooks do."""
    if max_new_tokens < 1:
        return [[] for _ in texts]
    from probe.forward import on_fused_path

    with model.lock, on_fused_path(model):  # the model's SDPA attention where exact (positions: cache length)
        return greedy_continuations(model.hf_model, model.tokenizer, texts, max_new_tokens, batch_size,
                                    add_special_tokens, stop_ids)


@torch.no_grad()
def greedy_decode(hf_model: Any, ids: torch.Tensor, max_new_tokens: int, stops: Collection[int]) -> torch.Tensor:
    """Greedy continuation `[1, n_new]` of one prompt with a full `DynamicCache`, stopping before a stop id.

    The one decode loop behind `LoadedModel.generate` on either path (bridge or fused): a full cache keeps
    every key in every layer, so interventions' absolute positions (KV length - query length) stay right on
    sliding-window layers."""
    from transformers import DynamicCache

    new: list[int] = []
    cache = DynamicCache()
    logits = hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        new.append(token)
        step = torch.tensor([[token]], device=ids.device)
        logits = hf_model(step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return torch.tensor([new], dtype=torch.long, device=ids.device)


@torch.no_grad()
def decode_variants(model: Any, ids: torch.Tensor, variants: Sequence[Sequence[Any]], max_new_tokens: int,
                    stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """Greedy continuations of one prompt under each of several intervention sets that leave the prompt
    itself alone (every intervention starts at or after the prompt's end: DuoAttention's decode-only
    streaming heads, for one). Why: the prompt's KV cache is then the same for every variant, so it is
    prefilled once, copied to one batch row per variant, and all variants decode together, each row under
    its own interventions (`rows=(r,)`), on the fused path where exact. Each row equals
    `model.generate` under its set alone up to batched float rounding (tests/test_generation.py). Interventions
    already open on the model (`intervene()` blocks) apply to every row, prompt included."""
    from dataclasses import replace

    from transformers import DynamicCache

    from probe.errors import ProbeError
    from probe.forward import on_fused_path
    from probe.interventions import intervene

    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ProbeError("decode_variants() takes one prompt.")
    if not variants:
        return []
    prompt = ids.shape[1]
    rowed = []
    for row, variant in enumerate(variants):
        for intervention in variant:
            if intervention.start < prompt or intervention.rows is not None:
                raise ProbeError(f"decode_variants: {intervention.describe()} touches the prompt (start < {prompt}) "
                                 "or names batch rows; run model.generate per variant instead.")
            rowed.append(replace(intervention, rows=(row,)))
    model.check_fits(prompt + max_new_tokens)
    stops = set(stop_ids or ()) | _default_stops(model.tokenizer)
    n = len(variants)
    new: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens < 1:
        return new
    with model.lock:
        cache = DynamicCache()
        with on_fused_path(model):
            logits = model.hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        cache.batch_repeat_interleave(n)
        tokens = logits[:, -1].argmax(-1).expand(n)
        done = [False] * n
        with intervene(model, rowed), on_fused_path(model):
            for step in range(max_new_tokens):
                for row in range(n):
                    if not done[row]:
                        token = int(tokens[row])
                        if token in stops:
                            done[row] = True
                        else:
                            new[row].append(token)
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = model.hf_model(tokens[:, None].to(ids.device), past_key_values=cache, use_cache=True,
                                        logits_to_keep=1).logits
                tokens = logits[:, -1].argmax(-1)
    return new
