"""Greedy generation in left-padded batches: probe's one padded generation path.

Left padding keeps every row's last prompt token at the end of the batch, so one Hugging Face
`generate` call with a KV cache continues all rows at once; the attention mask hides the padding and
the model derives positions from it (rotary and learned positions both see each row from 0), so a
row continues exactly as it would alone (tests/core/test_generation.py checks this per family).

`greedy_continuations` works on any Hugging Face causal LM (the organism trains a raw one);
`greedy_generate` runs a `LoadedModel` holding its lock, so the interventions attached to it are in effect
for every step: on the fused path (`probe.fused`, the model's SDPA attention, the open `intervene()`
blocks handed over, positions from the cache length) where `model.fused_reason()` says that is exact,
else through the hooks on the bridge's components (which the bridge swapped into the HF modules).

Every other cached greedy decode of probe and the analyzers steps through one loop, `greedy_steps`,
on a `growing_cache()`: one prompt (`greedy_decode`, behind `LoadedModel.generate`), one prompt under
several intervention sets from one shared prefill (`decode_variants`), retrieval's detection decode
(a per-step attention read-out) and its masking decode (finished rows leave the batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Container, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from probe import prompting
from probe.errors import ProbeError
from probe.interventions import intervene
from probe.loaded import LoadedModel
from probe.routing import on_fused_path


# ---- a KV cache that grows in place ---------------------------------------------------------------------

HEADROOM_MIN = 64  # spare positions a growing cache layer allocates at least (a decode step adds one)


def _growing_layer_class() -> type:
    """`GrowingLayer`, built on first use (transformers is imported lazily across probe)."""
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer whose keys / values are views into a buffer with spare positions: a
        decode step writes its key in place instead of concatenating a new tensor.

        Why: `DynamicLayer.update` allocates every layer's keys and values anew at each step, one position
        longer than the block it frees; glibc's heap cannot reuse those holes, so the resident set grows
        by hundreds of MB within one long-prompt decode and falls back only on a trim (retrieval's quick
        detection on SmolLM2: peak 2,571 MiB with `DynamicLayer`, live data ~1.2 GB). The buffer grows by
        an eighth (at least `HEADROOM_MIN` positions), so a prompt's prefill and its decode allocate once.
        Values are the same tensors `DynamicLayer` would hold (the views are strided, not copies).
        Anything else that replaces `keys` (crop, reorder, offload) is adopted at the next update."""

        _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        _views: tuple[torch.Tensor, torch.Tensor] | None = None

        def _ours(self) -> bool:
            return self._views is not None and self._views[0] is self.keys and self._views[1] is self.values

        def _place(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            self._buffers = (keys, values)
            self.keys, self.values = keys[..., :length, :], values[..., :length, :]
            self._views = (self.keys, self.values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.get_seq_length()
            need = length + key_states.shape[-2]
            fits = self._ours() and self._buffers is not None and need <= self._buffers[0].shape[-2]
            if not fits:
                capacity = need + max(HEADROOM_MIN, need // 8)
                grown = tuple(states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
                              for states in (key_states, value_states))
                if length:
                    grown[0][..., :length, :].copy_(self.keys)
                    grown[1][..., :length, :].copy_(self.values)
                self._buffers = grown
            keys, values = self._buffers
            keys[..., length:need, :].copy_(key_states)
            values[..., length:need, :].copy_(value_states)
            self._place(keys, values, need)
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Each row `repeats` times, written straight into a buffer with headroom (no second copy)."""
            length = self.get_seq_length()
            if length == 0:
                return
            out = []
            for states in (self.keys, self.values):
                batch, rest = states.shape[0], states.shape[1:-2]
                capacity = length + max(HEADROOM_MIN, length // 8)
                buffer = states.new_empty(batch * repeats, *rest, capacity, states.shape[-1])
                buffer.view(batch, repeats, *rest, capacity, states.shape[-1])[..., :length, :].copy_(
                    states[:, None].expand(batch, repeats, *states.shape[1:]))
                out.append(buffer)
            self._place(out[0], out[1], length)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the `indices` rows, headroom included (one allocation)."""
            length = self.get_seq_length()
            if length == 0:
                return
            if not (self._ours() and self._buffers is not None):
                super().batch_select_indices(indices)
                return
            self._place(self._buffers[0][indices], self._buffers[1][indices], length)

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


_GROWING_LAYER: type | None = None


def growing_cache() -> Any:
    """A full `DynamicCache` (every key in every layer, as probe's decode loops need) whose layers grow in
    place (`GrowingLayer`): the cache every probe decode loop uses."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    cache = DynamicCache()
    Cache.__init__(cache, layer_class_to_replicate=_growing_layer_class())
    return cache


def _pad_id(hf_model: PreTrainedModel, tokenizer: Any, stops: Collection[int]) -> int:
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


def _cut(row: list[int], stops: Collection[int]) -> list[int]:
    """The row up to and including its first stop id (generate pads finished rows after it)."""
    for index, token in enumerate(row):
        if token in stops:
            return row[: index + 1]
    return row


@torch.no_grad()
def greedy_continuations(hf_model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
                         batch_size: int = 16, add_special_tokens: bool = False,
                         stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids per text, cut after the first stop id, which is kept) of
    already rendered prompt texts, in left-padded batches with a KV cache. `stop_ids` default: the
    tokenizer's eos; an empty collection generates `max_new_tokens` for every row."""
    stops = prompting.stop_ids(tokenizer, "eos") if stop_ids is None else {int(s) for s in stop_ids}
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


def greedy_generate(model: LoadedModel, texts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                    add_special_tokens: bool = False, stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """`greedy_continuations` on a `LoadedModel`, holding `model.lock` for all batches: interventions
    attached to the model (`probe.interventions.intervene`) apply, and no other thread's hooks do."""
    if max_new_tokens < 1:
        return [[] for _ in texts]
    with model.lock, on_fused_path(model):  # the model's SDPA attention where exact (positions: cache length)
        return greedy_continuations(model.hf_model, model.tokenizer, texts, max_new_tokens, batch_size,
                                    add_special_tokens, stop_ids)


@torch.no_grad()
def greedy_steps(hf_model: PreTrainedModel, cache: Any, max_new_tokens: int, stops: Container[int], device: Any, *,
                 logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None, rows: int = 1,
                 shrink: bool = False,
                 context: Callable[[list[int]], contextlib.AbstractContextManager[Any]] | None = None,
                 forward_after_budget: bool = False,
                 on_step: Callable[[int, torch.Tensor], None] | None = None) -> list[list[int]]:
    """The one cached greedy decode loop: new token ids of each of `rows` rows, a row ending before its
    first token in `stops` (`prompting.stop_ids`) or after `max_new_tokens`.

    It starts from `logits` (a prefill's, `[1 or rows, T, vocab]`: one row is every row's, as when one
    prompt is decoded under several intervention sets) or from `tokens` (`[rows, 1]`, fed first); every
    step feeds each row its argmax through `hf_model` with `cache`. A finished row keeps its batch row
    (its tokens are ignored), unless `shrink`: then it leaves the batch (`cache.batch_select_indices`) and
    the smaller batch decodes on. `context(active)` is entered around the steps, `active` being the row
    that each batch row decodes, and entered anew after the batch shrinks (per-row interventions name
    batch rows). `forward_after_budget` runs the forward of the last kept token too (`greedy_decode`'s
    loop does). `on_step(step, logits)` sees each step's logits before its tokens are picked."""
    generated: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens < 1 or rows < 1:
        return generated
    active = list(range(rows))
    done = [False] * rows
    step = 0
    while True:
        with context(active) if context is not None else contextlib.nullcontext():
            while True:
                if logits is None:
                    logits = hf_model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                if on_step is not None:
                    on_step(step, logits)
                picked = logits[:, -1].argmax(-1)
                if picked.shape[0] != len(active):  # a shared prefill's one row continues every row
                    picked = picked.expand(len(active))
                values = picked.tolist()
                for batch_row, row in enumerate(active):
                    if not done[row]:
                        if values[batch_row] in stops:
                            done[row] = True
                        else:
                            generated[row].append(values[batch_row])
                step += 1
                logits = None
                if all(done[row] for row in active):
                    return generated
                if not shrink:
                    tokens = picked[:, None].to(device)
                    if step == max_new_tokens:
                        if forward_after_budget:
                            hf_model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
                        return generated
                    continue
                if step == max_new_tokens:
                    return generated
                keep = [batch_row for batch_row, row in enumerate(active) if not done[row]]
                tokens = torch.tensor([values[batch_row] for batch_row in keep], device=device).view(-1, 1)
                if len(keep) < len(active):
                    active = [active[batch_row] for batch_row in keep]
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    break  # the context again, for the smaller batch


@torch.no_grad()
def greedy_decode(hf_model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int, stops: Collection[int]) -> torch.Tensor:
    """Greedy continuation `[1, n_new]` of one prompt with a full `DynamicCache`, stopping before a stop id.

    The one decode behind `LoadedModel.generate` on either path (bridge or fused): a full cache keeps
    every key in every layer, so interventions' absolute positions (KV length - query length) stay right on
    sliding-window layers."""
    cache = growing_cache()
    logits = hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    new = greedy_steps(hf_model, cache, max_new_tokens, stops, ids.device, logits=logits, forward_after_budget=True)
    return torch.tensor(new, dtype=torch.long, device=ids.device)


@torch.no_grad()
def decode_variants(model: LoadedModel, ids: torch.Tensor, variants: Sequence[Sequence[Any]], max_new_tokens: int,
                    stop_ids: Collection[int] | None = None) -> list[list[int]]:
    """Greedy continuations of one prompt under each of several intervention sets that leave the prompt
    itself alone (every intervention starts at or after the prompt's end: DuoAttention's decode-only
    streaming heads, for one). Why: the prompt's KV cache is then the same for every variant, so it is
    prefilled once, copied to one batch row per variant, and all variants decode together, each row under
    its own interventions (`rows=(r,)`), on the fused path where exact. Each row equals
    `model.generate` under its set alone up to batched float rounding (tests/core/test_generation.py). Interventions
    already open on the model (`intervene()` blocks) apply to every row, prompt included."""
    from dataclasses import replace

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
    stops = set(stop_ids or ()) | prompting.stop_ids(model, "eos")
    n = len(variants)
    if max_new_tokens < 1:
        return [[] for _ in range(n)]

    @contextlib.contextmanager
    def every_variant(active: list[int]) -> Any:
        with intervene(model, rowed), on_fused_path(model):
            yield

    with model.lock:
        cache = growing_cache()
        with on_fused_path(model):
            logits = model.hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        cache.batch_repeat_interleave(n)
        return greedy_steps(model.hf_model, cache, max_new_tokens, stops, ids.device, logits=logits, rows=n,
                            context=every_variant)
