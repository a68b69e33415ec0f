"""Forwards that need no attention pattern, on the model's own attention kernel (SDPA).

The TransformerLens bridge replaces each decoder layer's attention with a component that recomputes
attention eagerly (`transformer_lens/model_bridge/generalized_components/position_embeddings_attention.py`:
the full `[B, H, T, T]` pattern, whatever `config._attn_implementation` says), so that `hook_attn_scores`
and `hook_pattern` can fire. A forward that reads only logits or head outputs pays for that pattern
(SmolLM2, 2,048 tokens, one thread: ~4x the plain SDPA forward; bench/bench_fused.py).

The fused path runs the same weights without that component. What the bridge does to the HF model, and
what this module undoes for the length of one call (under `model.lock`, restored on exit, also on error):

- the bridge puts its `AttentionBridge` into each HF decoder layer's attention slot (`self_attn`, `attn`,
  `attention`) and keeps the HF attention module as its `original_component`; the HF module's own
  projections (`q_proj` ... `o_proj`, `c_attn`, `c_proj`, `query_key_value`, `dense`) are the bridge's
  `LinearBridge`s, whose `hook_in` / `hook_out` stay live (`hook_z` is an alias of `o.hook_in`).
  Here the slot gets the HF module back, and the config's attention implementation is set to "sdpa"
  ("eager", HF's own eager kernel, on families with an attention-logit soft-cap, which SDPA lacks:
  Gemma 2), so the HF module calls `torch.nn.functional.scaled_dot_product_attention` (flash / memory-
  efficient kernels on a GPU) on the model's own masks: causal, padding and per-layer sliding windows.
- head-output interventions (zero / mean / resample ablation, value and output scaling) are applied by a
  forward pre-hook on the output projection (`architecture(model).attention(layer).o_path`): its input
  is z with the query heads concatenated, so each operation touches exactly one query head's `d_head`
  slice (grouped-query attention included: a value scale on one query head scales only its z, which is
  exact because z = A·v is linear in v for a fixed pattern). Their positions, rows and values follow
  `probe.interventions` (the same helpers); the position offset during cached decoding comes from the
  KV cache's length before each forward (a pre-hook on the HF model), not from the score hook, which
  does not fire here.
- DuoAttention's streaming heads (`Kind.STREAMING`) become a per-head mask: the model's mask for the
  layer (or the causal mask where HF leaves it to `is_causal`) AND sink ∪ recent window on the chosen
  heads, handed to the kernel as it is (boolean for SDPA, additive for eager).
- uniform attention and query scaling (`Kind.UNIFORM`, `Kind.SCALE_QUERY`) act on the query the kernel
  receives, after the family's norms and rotary: a zero query gives every visible key the score 0 (exact
  uniform attention over the keys the layer's own mask shows), a query scaled by s scales every score by
  s (before a soft-cap, as the bridge's). A reference-counted wrapper of transformers' kernel registry
  (`ALL_ATTENTION_FUNCTIONS`) rewrites the query of the registered modules and checks that each one ran
  through it; kernel observers (`kernel_pattern`) see the same inputs, e.g. a decode step's attention row.

Every intervention kind is served. What sends a forward to the bridge instead (`probe.fused_checks`,
a `FusedPathError` here): a hook attached to a hook point of the bridge's attention component that the
HF module never calls (`hook_attn_scores`, `hook_pattern`, `hook_rot_q`, `hook_attn_out` ...), which under
SDPA would silently never fire; another hook on a `hook_z` that carries head-output interventions (the
bridge runs them in the order they were attached); `output_attentions`; query-level interventions on an
eager kernel the family does not export. Hooks elsewhere (residual, MLP, norms, the projections'
`hook_in`/`hook_out`, `hook_z`) fire as in a bridge forward. `probe.routing` decides, per forward, which
path a `LoadedModel` takes.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from probe.architecture import architecture
from probe.errors import InterventionError, ProbeError
from probe.fused_checks import (
    ON_QUERY,
    FusedPathError,
    _configs,
    _swap_slots,
    check_served,
    implementation,
    unserved_reason,
)
from probe.head_ops import ON_Z, Intervention, Kind, _position_window, _row_index, apply_z_ops, streaming_keep
from probe.heads import Head, validate_heads
from probe.loaded import LoadedModel, Positions

__all__ = ["FusedPathError", "KernelObserver", "apply_query_ops", "check_served", "fused", "fused_logits",
           "implementation", "kernel_pattern", "unserved_reason"]


# ---- the path -----------------------------------------------------------------------------------

@dataclass
class _State:
    offset: int = 0  # positions already in the KV cache before the current forward
    full_cache: bool = True  # False when the cache truncates keys to a sliding window


Ops = dict[int, list[tuple[Intervention, Head]]]


def _group(interventions: Sequence[Intervention]) -> tuple[Ops, Ops, Ops]:
    """Per layer: head-output ops (output projection's input), streaming masks, query ops (kernel's query)."""
    on_output: Ops = defaultdict(list)
    on_mask: Ops = defaultdict(list)
    on_query: Ops = defaultdict(list)
    for intervention in interventions:
        if intervention.kind in ON_Z:
            target = on_output
        elif intervention.kind in ON_QUERY:
            target = on_query
        else:
            target = on_mask
        for head in intervention.heads:
            target[head.layer].append((intervention, head))
    return on_output, on_mask, on_query


def apply_query_ops(query: torch.Tensor, ops: Sequence[tuple[Intervention, Head]], offset: int) -> torch.Tensor:
    """The kernel's query `[batch, n_heads, q_len, d_head]` (after the family's norms and rotary) with
    uniform attention (query 0: every visible key scores 0, so the head takes the plain mean of the values
    it sees, through the layer's own causal / padding / sliding-window mask) and query scaling (x s: every
    score x s, soft-capped after, as the bridge's `cap·tanh(s·atanh(c/cap))`) on their heads, rows and
    positions; `offset` = positions already in the KV cache. Returns a new tensor."""
    query = query.clone()
    for intervention, head in ops:
        rows = _row_index(intervention, query.shape[0])
        lo, hi = _position_window(intervention, offset, query.shape[2])
        if hi <= lo:
            continue
        if intervention.kind is Kind.UNIFORM:
            query[rows, head.head, lo:hi] = 0.0
        elif intervention.kind is Kind.SCALE_QUERY:
            query[rows, head.head, lo:hi] = query[rows, head.head, lo:hi] * intervention.factor
        else:
            raise InterventionError(f"{intervention.describe()} does not act on a head's query.")
    return query


# Query ops of the HF attention modules inside a fused block: id(module) -> (ops, state). The kernels are
# looked up by name on every call (`ALL_ATTENTION_FUNCTIONS.get_interface`), so while any block has query
# ops or observers, the kernel's name maps to `_query_kernel`'s wrapper, which rewrites the query of registered modules and
# hands every call (any module, any thread) to the kernel it replaced.
# An observer sees each kernel call of its layer: (query, key, attention_mask, kwargs), after the query ops.
KernelObserver = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", dict[str, Any]], None]


@dataclass
class _QueryEntry:
    ops: list[tuple[Intervention, Head]]
    state: _State
    seen: bool = False  # the kernel wrapper ran for the module's current call
    observer: KernelObserver | None = None


_QUERY_OPS: dict[int, _QueryEntry] = {}
_KERNEL_LOCK = threading.Lock()
_KERNEL_USERS: dict[str, int] = {}
_REPLACED: dict[str, Callable[..., Any] | None] = {}  # a local override the wrapper replaced (None: there was none)


def _kernel_for(name: str, module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    replaced = _REPLACED.get(name)
    if replaced is not None:
        return replaced
    if name == "eager":  # each family's own eager kernel (the default its attention passes to get_interface)
        kernel = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if kernel is None:
            raise FusedPathError(f"{type(module).__module__} has no eager_attention_forward for query-level "
                                 "interventions on the fused path.")
        return kernel
    return ALL_ATTENTION_FUNCTIONS._global_mapping[name]


def _query_kernel(name: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        entry = _QUERY_OPS.get(id(module))
        if entry is not None:
            if entry.ops:
                query = apply_query_ops(query, entry.ops, entry.state.offset)
            if entry.observer is not None:
                mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
                entry.observer(query, args[0] if args else kwargs["key"], mask, kwargs)
            entry.seen = True
        return _kernel_for(name, module)(module, query, *args, **kwargs)
    attention._probe_query_kernel = True  # type: ignore[attr-defined]
    return attention


def kernel_pattern(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   kwargs: dict[str, Any]) -> torch.Tensor:
    """The attention weights `[batch, n_heads, q_len, k_len]` (float32) of one kernel call, from its inputs as a
    `KernelObserver` sees them, with the bridge's order of operations: q·kᵀ, x scaling, soft-cap, mask,
    float32 softmax. Keys are repeated over their query-head group (GQA); a missing mask is causal."""
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scaling = kwargs.get("scaling")
    scores = torch.matmul(query, keys.transpose(-2, -1)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    softcap = kwargs.get("softcap")
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    if attention_mask is None:
        rows = torch.arange(k_len - q_len, k_len, device=scores.device)[:, None]
        visible = torch.arange(k_len, device=scores.device)[None, :] <= rows
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask[..., :k_len]
    else:
        visible = attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def _query_seen_reset(entry: _QueryEntry) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        entry.seen = False
    return hook


def _query_seen_check(entry: _QueryEntry, layer: int) -> Any:
    """After the module's forward: its kernel went through `_query_kernel` (a family that looks its kernel
    up elsewhere would silently skip the query ops)."""
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not entry.seen:
            raise FusedPathError(f"layer {layer}'s attention ({type(module).__name__}) did not call its kernel "
                                 "through transformers' ALL_ATTENTION_FUNCTIONS: query-level interventions "
                                 "cannot run on its fused path.")
    return hook


@contextlib.contextmanager
def _query_ops_installed(kernel: str, registered: dict[int, _QueryEntry]) -> Iterator[None]:
    """Register `registered` (module id -> ops) and route the kernel's name through `_query_kernel` for the block."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not registered:
        yield
        return
    mapping = ALL_ATTENTION_FUNCTIONS._local_mapping
    with _KERNEL_LOCK:
        if _KERNEL_USERS.get(kernel, 0) == 0:
            _REPLACED[kernel] = mapping.get(kernel)
            mapping[kernel] = _query_kernel(kernel)
        _KERNEL_USERS[kernel] = _KERNEL_USERS.get(kernel, 0) + 1
        _QUERY_OPS.update(registered)
    try:
        yield
    finally:
        with _KERNEL_LOCK:
            for key in registered:
                _QUERY_OPS.pop(key, None)
            _KERNEL_USERS[kernel] -= 1
            if _KERNEL_USERS[kernel] == 0:
                replaced = _REPLACED.pop(kernel, None)
                if replaced is None:
                    mapping.pop(kernel, None)
                else:
                    mapping[kernel] = replaced


def _output_pre_hook(ops: list[tuple[Intervention, Head]], state: _State, n_heads: int, d_head: int) -> Any:
    """Rewrite query heads' slices of z (the output projection's input), as `probe.interventions` does on hook_z."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        flat = args[0]
        z = apply_z_ops(flat.reshape(*flat.shape[:-1], n_heads, d_head), ops, state.offset)  # [B, T, H, dh]
        return (z.reshape(flat.shape), *args[1:])

    return hook


def _mask_pre_hook(ops: list[tuple[Intervention, Head]], state: _State, n_heads: int, parameters: list[str]) -> Any:
    """AND the streaming heads' sink ∪ recent window into the layer's mask (per head), before the kernel."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        bound = dict(zip(parameters, args))
        bound.update(kwargs)
        hidden = bound["hidden_states"]
        if not state.full_cache:
            raise FusedPathError("streaming attention on the fused path needs a cache that keeps every key "
                                 "(transformers.DynamicCache()), not a sliding-window cache.")
        batch, q_len = hidden.shape[0], hidden.shape[1]
        given = bound.get("attention_mask")
        if given is None:  # HF left causality to the kernel's is_causal: write it out
            k_len = state.offset + q_len
            keys = torch.arange(k_len, device=hidden.device)
            queries = torch.arange(q_len, device=hidden.device) + state.offset
            visible = (keys[None, :] <= queries[:, None])[None, None]
            additive, dtype = not _is_sdpa(module), hidden.dtype
        else:
            additive, dtype = given.dtype != torch.bool, given.dtype
            visible = given if not additive else given > torch.finfo(given.dtype).min / 2
            k_len = given.shape[-1]
        mask = visible.expand(batch, n_heads, q_len, k_len).clone()
        for intervention, head in ops:
            mask[:, head.head] &= streaming_keep(intervention, state.offset, batch, q_len, k_len, hidden.device)
        if additive:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        if "attention_mask" in kwargs or "attention_mask" not in parameters[:len(args)]:
            kwargs = {**kwargs, "attention_mask": mask}
        else:
            args = tuple(mask if name == "attention_mask" else value for name, value in zip(parameters, args))
        return args, kwargs

    return hook


def _is_sdpa(module: nn.Module) -> bool:
    return getattr(getattr(module, "config", None), "_attn_implementation", "sdpa") == "sdpa"


def _offset_pre_hook(state: _State) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        state.offset = int(cache.get_seq_length()) if cache is not None else 0
        state.full_cache = cache is None or not any(getattr(cache, "is_sliding", None) or [])
    return hook


@contextlib.contextmanager
def fused(model: LoadedModel, interventions: Sequence[Intervention] = (),
          observers: dict[int, KernelObserver] | None = None) -> Iterator[_State]:
    """For the block, every forward of `model.hf_model` runs the HF attention modules on the fused kernel
    with `interventions` in effect (any driver: a plain call, a KV-cached loop, HF `generate`); everything
    is restored on exit. Holds `model.lock` for the whole block. Raises `FusedPathError` for what it cannot
    serve (see `unserved_reason`). `observers` (layer -> callable) see that layer's kernel inputs on each
    call (query after rotary and query ops, keys with the cache, the mask): e.g. `kernel_pattern` for a
    decode step's attention row without the bridge (retrieval's copy test); a family whose attention does
    not call its kernel through transformers' registry raises `FusedPathError` on the first forward."""
    interventions = list(interventions)
    for intervention in interventions:
        validate_heads(intervention.heads, model)
        if intervention.kind in (Kind.MEAN, Kind.RESAMPLE) and intervention.values is None:
            raise InterventionError(f"{intervention.kind.value} ablation needs values.")
    with model.lock:
        check_served(model, interventions)
        arch = architecture(model)
        slots = _swap_slots(model)
        assert slots is not None  # checked above
        kernel = implementation(model)
        configs = _configs(model)
        on_output, on_mask, on_query = _group(interventions)
        state = _State()
        previous = {id(config): config._attn_implementation_internal for config in configs}
        handles: list[Any] = []
        try:
            for config in configs:
                config._attn_implementation_internal = kernel
            for parent, name, _, original in slots:
                parent._modules[name] = original
            handles.append(model.hf_model.register_forward_pre_hook(_offset_pre_hook(state), with_kwargs=True))
            for layer, ops in sorted(on_output.items()):
                projection = model.hf_model.get_submodule(arch.attention(layer).o_path)
                if not any(projection is m for m in slots[layer][3].modules()):
                    raise FusedPathError(f"{model.spec}: layer {layer}'s output projection "
                                         f"({arch.attention(layer).o_path}) is not called by its HF attention module.")
                handles.append(projection.register_forward_pre_hook(
                    _output_pre_hook(ops, state, model.n_heads, model.d_head)))
            for layer, ops in sorted(on_mask.items()):
                original = slots[layer][3]
                parameters = list(inspect.signature(original.forward).parameters)
                handles.append(original.register_forward_pre_hook(
                    _mask_pre_hook(ops, state, model.n_heads, parameters), with_kwargs=True))
            entries = {}
            for layer in sorted(set(on_query) | set(observers or {})):
                original = slots[layer][3]
                entries[id(original)] = entry = _QueryEntry(on_query.get(layer, []), state,
                                                            observer=(observers or {}).get(layer))
                handles.append(original.register_forward_pre_hook(_query_seen_reset(entry)))
                handles.append(original.register_forward_hook(_query_seen_check(entry, layer)))
            with _query_ops_installed(kernel, entries):
                yield state
        finally:
            for handle in handles:
                handle.remove()
            for parent, name, bridge_attn, _ in slots:
                parent._modules[name] = bridge_attn
            for config in configs:
                config._attn_implementation_internal = previous[id(config)]


def _keep(positions: Positions, length: int, device: Any) -> int | torch.Tensor:
    """HF's `logits_to_keep`: 1 for "last", 0 for every position, else an index tensor."""
    if positions is None:
        return 0
    if isinstance(positions, str):
        if positions != "last":
            raise ProbeError(f"positions={positions!r}: use 'last', None (every position), a slice or indices.")
        return 1
    index = torch.arange(length, device=device)
    chosen = index[positions] if isinstance(positions, slice) else index[torch.as_tensor(list(positions), device=device)]
    if chosen.numel() == 0:
        raise ProbeError(f"positions={positions!r} selects no position of a {length}-token input.")
    return chosen


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D padding mask, as the bridge derives them (left padding: each row from 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def fused_logits(model: LoadedModel, ids: torch.Tensor, interventions: Sequence[Intervention] = (),
                 positions: Positions = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits `[batch, n_positions, vocab]` of one forward on the fused path (see module docstring).

    `positions`: "last", None (every position), a slice or position indices; only those rows of the
    unembedding are computed. `attention_mask`: a 2-D `[batch, T]` padding mask (1 = token), positions
    derived from it as the bridge does. Interventions as `probe.interventions` builds them; those that need
    the pattern raise `FusedPathError`."""
    if ids.dim() == 1:
        ids = ids[None]
    model.check_fits(ids.shape[-1])
    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": _keep(positions, ids.shape[-1], ids.device)}
    if attention_mask is not None:
        if attention_mask.shape != ids.shape:
            raise ProbeError(f"attention_mask {tuple(attention_mask.shape)} must be the ids' shape {tuple(ids.shape)}.")
        kwargs["attention_mask"] = attention_mask.to(ids.device)
        kwargs["position_ids"] = _positions_from_mask(kwargs["attention_mask"])
    with fused(model, interventions):
        return model.hf_model(ids, **kwargs).logits
