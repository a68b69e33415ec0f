"""Writing weights through the architecture layer: plant a known mechanism in any family.

`probe.architecture` reads a model; this module writes one. Every function takes a `LoadedModel`
and per-head weights in the bridge's own convention (the one `architecture(model).W_Q` reads back):

    W_Q, W_K, W_V  [d_model, d_head]   (x @ W: row-vector convention)
    W_O            [d_head, d_model]
    W_in, W_gate   [d_model, d_mlp],   W_out [d_mlp, d_model]

and writes them into the Hugging Face module tensors in place, in each family's own layout:

| projection | layout in the HF tensor | families |
|---|---|---|
| separate q/k/v/o `nn.Linear` | weight `[out, in]`, head h = rows h*d_head ... | Llama, Mistral, Mixtral, Qwen2/3, Gemma 2/3, OLMo-2 |
| packed `query_key_value` (`nn.Linear`) | rows interleaved per head: [q_h, k_h, v_h] for h = 0, 1, ... | GPT-NeoX / Pythia |
| packed `qkv_proj` (`nn.Linear`) | rows concatenated: all q, then all k, then all v (GQA sizes) | Phi-3 |
| packed `c_attn` (`Conv1D`) | weight `[in, 3 * d_model]`, columns q, k, v | GPT-2 |
| output `c_proj` (`Conv1D`) | weight `[in, out]` (the transpose of `nn.Linear`) | GPT-2 |

What the bridge caches (measured on transformers 5 / TransformerLens 4, tests/families/test_planted_families.py):
the bridge splits a packed qkv projection (q, k and v in one matrix) once, at boot, into its own q/k/v
linear modules and its forward runs those, not the packed HF module. On GPT-2 (`torch.tensor_split` of
`c_attn`) and Phi-3 (`torch.split` of `qkv_proj`) the split modules are views of the packed tensor, so
an in-place write is seen at once. On GPT-NeoX the split re-arranges the interleaved rows into new
tensors: a write into `query_key_value` changes neither the forward nor `bridge.W_Q` (measured:
replacing a layer's packed weight w by 3w + 0.5 moved the logits by exactly 0, where the same change to
the split q moved them by 2e-4, to the split v by 0.14). Every write here therefore ends by re-running
the bridge's own split function on the packed module and copying its result into the split modules where
they do not share memory (`_resync`); the read-back `architecture(model, refresh=True).W_Q` then goes
through the bridge's split, an independent check of the layouts above. Everything else (separate
projections, MLPs, norms, embeddings) is one tensor that the bridge and the HF module share.
`architecture(model)` keeps the stacked weights it read: after writing, pass `refresh=True` (the
functions here drop the cached one, and recompute `model.fingerprint`, under which results are cached,
from the written weights: a model built by writes has the fingerprint it would have if loaded so).

`new_model` builds a zeroed-or-seeded model of a family from a `Shape` (the configs a planted builder
needs: free d_head where the family allows it, huge rotary bases) and wraps it as a `LoadedModel`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from probe.architecture import Architecture, MissingComponentError, architecture, hf_module
from probe.errors import ProbeError
from probe.hf import wrap_hf_model
from probe.loaded import LoadedModel, _fingerprint

__all__ = ["PlantError", "Shape", "FAMILIES", "new_model", "set_q", "set_k", "set_v", "set_o",
           "set_head_qk", "set_head_ov", "zero_attention", "zero_mlp", "set_mlp", "set_embedding",
           "zero_positions", "set_learned_positions", "set_unembedding", "set_norm", "reset_norms", "zero_all"]

# HF class -> layout of a packed qkv nn.Linear (Conv1D is recognised by its type).
PACKED_QKV_LAYOUT = {"GPTNeoXForCausalLM": "per-head", "Phi3ForCausalLM": "concat"}
QKV = ("q", "k", "v")


class PlantError(ProbeError):
    """A write the planting layer cannot do on this model (unknown packed layout, wrong shape)."""


# ---- building a model of a family ------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What a planted model needs of its config; `rope_theta` None keeps the family's default,
    `partial_rotary` the rotated share of d_head (GPT-NeoX only), `norm_eps` None the family's default."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    rope_theta: float | None = None
    norm_eps: float | None = None
    partial_rotary: float = 0.25
    bos: int = 1
    eos: int = 2
    pad: int = 3


def _special(s: Shape) -> dict[str, Any]:
    return {"bos_token_id": s.bos, "eos_token_id": s.eos, "pad_token_id": s.pad}


def _common(s: Shape) -> dict[str, Any]:
    kwargs = {"vocab_size": s.vocab, "hidden_size": s.d_model, "intermediate_size": s.d_mlp,
              "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
              "num_key_value_heads": s.n_kv_heads, "head_dim": s.d_head, "max_position_embeddings": s.n_ctx,
              "tie_word_embeddings": False, **_special(s)}
    if s.rope_theta is not None:
        kwargs["rope_theta"] = s.rope_theta
    if s.norm_eps is not None:
        kwargs["rms_norm_eps"] = s.norm_eps
    return kwargs


def _tied_head_dim(family: str, s: Shape) -> None:
    if s.d_head * s.n_heads != s.d_model:
        raise PlantError(f"{family}: d_head is d_model / n_heads in this family ({s.d_model} / {s.n_heads}), "
                         f"not {s.d_head}.")
    if s.n_kv_heads != s.n_heads:
        raise PlantError(f"{family} has no grouped-query attention: n_kv_heads must equal n_heads.")


def _llama(s: Shape) -> Any:
    return transformers.LlamaConfig(**_common(s))


def _qwen3(s: Shape) -> Any:
    return transformers.Qwen3Config(**_common(s), use_sliding_window=False)


def _gemma3(s: Shape) -> Any:
    # every layer full attention (no window), no soft-caps, 1/sqrt(d_head) scale: the planted maths as in Llama
    return transformers.Gemma3TextConfig(**_common(s), query_pre_attn_scalar=s.d_head, sliding_window=s.n_ctx,
                                         layer_types=["full_attention"] * s.n_layers,
                                         attn_logit_softcapping=None, final_logit_softcapping=None)


def _gpt_neox(s: Shape) -> Any:
    _tied_head_dim("gpt_neox", s)
    kwargs: dict[str, Any] = {"vocab_size": s.vocab, "hidden_size": s.d_model, "intermediate_size": s.d_mlp,
                              "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
                              "rotary_pct": s.partial_rotary, "use_parallel_residual": True,
                              "max_position_embeddings": s.n_ctx, "tie_word_embeddings": False, **_special(s)}
    if s.rope_theta is not None:
        kwargs["rope_theta"] = s.rope_theta
    if s.norm_eps is not None:
        kwargs["layer_norm_eps"] = s.norm_eps
    return transformers.GPTNeoXConfig(**kwargs)


def _gpt2(s: Shape) -> Any:
    _tied_head_dim("gpt2", s)
    kwargs: dict[str, Any] = {"vocab_size": s.vocab, "n_embd": s.d_model, "n_layer": s.n_layers,
                              "n_head": s.n_heads, "n_inner": s.d_mlp, "n_positions": s.n_ctx,
                              "tie_word_embeddings": False, "bos_token_id": s.bos, "eos_token_id": s.eos}
    if s.norm_eps is not None:
        kwargs["layer_norm_epsilon"] = s.norm_eps
    return transformers.GPT2Config(**kwargs)


# family -> (config builder, HF class name)
FAMILIES: dict[str, tuple[Any, str]] = {
    "llama": (_llama, "LlamaForCausalLM"),
    "qwen3": (_qwen3, "Qwen3ForCausalLM"),
    "gemma3": (_gemma3, "Gemma3ForCausalLM"),
    "gpt_neox": (_gpt_neox, "GPTNeoXForCausalLM"),
    "gpt2": (_gpt2, "GPT2LMHeadModel"),
}


def new_model(family: str, shape: Shape, tokenizer: Any, spec: str, hub_name: str = "",
              seed: int | None = None, zero: bool = True, device: str = "cpu") -> LoadedModel:
    """A `family` model of `shape`, wrapped (float32). `seed` seeds the HF init (the global RNG,
    as `probe.tiny` does); `zero` then zeroes every weight and sets every norm to the identity
    (effective weight 1, bias 0). Booting the bridge never draws from the global RNG here."""
    if family not in FAMILIES:
        raise PlantError(f"No planted-model config for family {family!r}; one of {', '.join(FAMILIES)}.")
    make_config, class_name = FAMILIES[family]
    config = make_config(shape)
    config.architectures = [class_name]
    if seed is not None:
        torch.manual_seed(seed)
    hf = getattr(transformers, class_name)(config).eval()
    with torch.random.fork_rng():
        model = wrap_hf_model(hf, tokenizer, spec, hub_name=hub_name or spec, device=device)
    if zero:
        zero_all(model)
    return model


# ---- where each head lives in the HF tensors -------------------------------------------------------

def _arch(model: LoadedModel) -> Architecture:
    return architecture(model)


def _attn(model: LoadedModel, layer: int) -> Any:
    return _arch(model).blocks[layer].attn


def _packed_qkv(model: LoadedModel, layer: int) -> tuple[nn.Module, str] | None:
    """The packed qkv HF module of a layer and its layout, or None (separate projections)."""
    attn = _attn(model, layer)
    if "qkv" not in attn._modules:
        return None
    module = hf_module(attn.qkv)
    if isinstance(module, Conv1D):
        return module, "conv1d"
    layout = PACKED_QKV_LAYOUT.get(model.architecture)
    if layout is None:
        raise PlantError(f"{model.spec} ({model.architecture}): packed qkv projection of unknown layout; "
                         f"the planting layer knows {', '.join(PACKED_QKV_LAYOUT)} and GPT-2's Conv1D.")
    return module, layout


def _packed_index(model: LoadedModel, which: str, index: int, layout: str) -> torch.Tensor:
    """Output indices (rows of an nn.Linear, columns of a Conv1D) of head `index`'s q, k or v."""
    dh, H, K = model.d_head, model.n_heads, model.n_kv_heads
    part = QKV.index(which)
    span = torch.arange(dh)
    if layout == "per-head":  # GPT-NeoX: view(..., H, 3 * dh).chunk(3, -1)
        return index * 3 * dh + part * dh + span
    if layout == "concat":    # Phi-3: [H * dh | K * dh | K * dh]
        return (0, H * dh, H * dh + K * dh)[part] + index * dh + span
    return part * H * dh + index * dh + span  # GPT-2 c_attn: split(d_model, dim=-1)


def _write_linear(module: nn.Module, index: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                  what: str) -> None:
    """Write W `[d_in, n]` into the outputs `index` of a Linear (`[out, in]`) or Conv1D (`[in, out]`)."""
    weight = module.weight
    W = W.to(weight.dtype)
    if isinstance(module, Conv1D):
        weight[:, index] = W
    else:
        weight[index, :] = W.T
    existing = getattr(module, "bias", None)
    if existing is not None:
        existing[index] = 0.0 if bias is None else bias.to(existing.dtype)
    elif bias is not None and bool((bias != 0).any()):
        raise PlantError(f"{what}: this model's projection has no bias to write.")


def _check(W: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    W = torch.as_tensor(W)
    if tuple(W.shape) != shape:
        raise PlantError(f"{what}: expected shape {list(shape)}, got {list(W.shape)}.")
    return W


@torch.no_grad()
def _set_qkv(model: LoadedModel, layer: int, which: str, index: int, W: torch.Tensor,
             bias: torch.Tensor | None) -> None:
    n = model.n_heads if which == "q" else model.n_kv_heads
    if not 0 <= index < n:
        raise PlantError(f"W_{which.upper()}: head {index} out of range (0..{n - 1}).")
    what = f"L{layer} W_{which.upper()}[{index}]"
    W = _check(W, (model.d_model, model.d_head), what)
    if bias is not None:
        bias = _check(bias, (model.d_head,), what + " bias")
    packed = _packed_qkv(model, layer)
    if packed is None:
        module = hf_module(getattr(_attn(model, layer), which))
        _write_linear(module, index * model.d_head + torch.arange(model.d_head), W, bias, what)
    else:
        module, layout = packed
        _write_linear(module, _packed_index(model, which, index, layout), W, bias, what)
        _resync(model, layer)
    _stale(model)


@torch.no_grad()
def _resync(model: LoadedModel, layer: int) -> None:
    """Re-split a packed qkv module with the bridge's own split and copy it into the bridge's q/k/v
    modules that do not share memory with the packed tensor (GPT-NeoX; GPT-2 and Phi-3 are views)."""
    attn = _attn(model, layer)
    fresh = attn.split_qkv_matrix(hf_module(attn))
    for which, new in zip(QKV, fresh):
        target = hf_module(getattr(attn, which))
        for name in ("weight", "bias"):
            old, value = getattr(target, name, None), getattr(new, name, None)
            if old is None or value is None or _shares(old, value):
                continue
            old.copy_(value.reshape(old.shape))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _stale(model: LoadedModel) -> None:
    """After a write: the cached architecture's stacked weights are old, and the fingerprint (results
    are cached under it) must name the new weights, as if the model had been loaded with them."""
    model.memo.pop("_architecture", None)
    model.fingerprint = _fingerprint(model.spec, model.hf_model)


# ---- per-head writes -------------------------------------------------------------------------------

def set_q(model: LoadedModel, layer: int, head: int, W_Q: torch.Tensor, b_Q: torch.Tensor | None = None) -> None:
    """Query weights `[d_model, d_head]` of query head `head` (bias: zero unless given)."""
    _set_qkv(model, layer, "q", head, W_Q, b_Q)


def set_k(model: LoadedModel, layer: int, kv_head: int, W_K: torch.Tensor, b_K: torch.Tensor | None = None) -> None:
    """Key weights of key/value head `kv_head` (shared by its query heads under GQA)."""
    _set_qkv(model, layer, "k", kv_head, W_K, b_K)


def set_v(model: LoadedModel, layer: int, kv_head: int, W_V: torch.Tensor, b_V: torch.Tensor | None = None) -> None:
    """Value weights of key/value head `kv_head`."""
    _set_qkv(model, layer, "v", kv_head, W_V, b_V)


@torch.no_grad()
def set_o(model: LoadedModel, layer: int, head: int, W_O: torch.Tensor) -> None:
    """Output weights `[d_head, d_model]` of query head `head` (its slice of the output projection's input)."""
    if not 0 <= head < model.n_heads:
        raise PlantError(f"W_O: head {head} out of range (0..{model.n_heads - 1}).")
    W = _check(W_O, (model.d_head, model.d_model), f"L{layer} W_O[{head}]")
    module = hf_module(_attn(model, layer).o)
    cols = head * model.d_head + torch.arange(model.d_head)
    if isinstance(module, Conv1D):
        module.weight[cols, :] = W.to(module.weight.dtype)
    else:
        module.weight[:, cols] = W.T.to(module.weight.dtype)
    _stale(model)


def set_head_qk(model: LoadedModel, layer: int, head: int, W_Q: torch.Tensor, W_K: torch.Tensor | None = None) -> None:
    """Query head `head`'s QK circuit; `W_K` goes to its key/value head (every sibling sees it under GQA)."""
    set_q(model, layer, head, W_Q)
    if W_K is not None:
        set_k(model, layer, _arch(model).kv_of(head), W_K)


def set_head_ov(model: LoadedModel, layer: int, head: int, W_V: torch.Tensor | None, W_O: torch.Tensor) -> None:
    """Query head `head`'s OV circuit; `W_V` goes to its key/value head (None: leave it)."""
    if W_V is not None:
        set_v(model, layer, _arch(model).kv_of(head), W_V)
    set_o(model, layer, head, W_O)


@torch.no_grad()
def zero_attention(model: LoadedModel, layer: int) -> None:
    """Every weight and bias of a layer's attention (q/k/v/o, packed or not); QK-norm weights are kept."""
    for tensor in _attention_tensors(model, layer):
        tensor.zero_()
    _stale(model)


def _attention_tensors(model: LoadedModel, layer: int) -> Iterator[torch.Tensor]:
    attn = _attn(model, layer)
    names = ("qkv", "o") if "qkv" in attn._modules else ("q", "k", "v", "o")
    for name in names:
        module = hf_module(getattr(attn, name))
        for tensor in (module.weight, getattr(module, "bias", None)):
            if isinstance(tensor, torch.Tensor):
                yield tensor
    if "qkv" in attn._modules:
        for name in QKV:  # split copies (GPT-NeoX) go with the packed tensor
            module = hf_module(getattr(attn, name))
            for tensor in (module.weight, getattr(module, "bias", None)):
                if isinstance(tensor, torch.Tensor):
                    yield tensor


# ---- MLP -------------------------------------------------------------------------------------------

@torch.no_grad()
def zero_mlp(model: LoadedModel, layer: int, out_only: bool = False) -> None:
    """Every parameter of a layer's MLP or MoE block (router and experts included): it adds nothing.
    `out_only` zeroes only a dense MLP's output projection (same function, input weights kept)."""
    mlp = _arch(model).blocks[layer].mlp
    if out_only:
        if "out" not in mlp._modules:
            raise PlantError(f"{model.spec}: layer {layer}'s MLP ({type(mlp).__name__}) has no dense output "
                             "projection.")
        params = list(hf_module(mlp._modules["out"]).parameters())
    else:
        params = list(mlp.parameters())
    for param in params:
        param.zero_()
    _stale(model)


@torch.no_grad()
def set_mlp(model: LoadedModel, layer: int, W_in: torch.Tensor, W_out: torch.Tensor, W_gate: torch.Tensor | None = None,
            b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None) -> None:
    """A dense MLP's weights: `W_in` / `W_gate` `[d_model, d_mlp]`, `W_out` `[d_mlp, d_model]` (biases zero
    unless given). MLP(x) = W_out^T act(x W_gate) * (x W_in) (gated) or act(x W_in + b_in) W_out + b_out."""
    mlp = _arch(model).blocks[layer].mlp
    parts = mlp._modules
    if "in" not in parts or "out" not in parts:
        raise PlantError(f"{model.spec}: layer {layer}'s MLP ({type(mlp).__name__}) has no dense in/out "
                         "projections to write (MoE blocks: use zero_mlp).")
    gated = "gate" in parts
    if gated != (W_gate is not None):
        raise PlantError(f"{model.spec}: layer {layer}'s MLP is {'gated: give W_gate' if gated else 'not gated'}.")
    writes = [("in", W_in, b_in), ("out", W_out, b_out)] + ([("gate", W_gate, None)] if gated else [])
    for name, W, bias in writes:
        module = hf_module(parts[name])
        W = torch.as_tensor(W)
        d_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]
        d_out = module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]
        _check(W, (d_in, d_out), f"L{layer} MLP {name}")
        _write_linear(module, torch.arange(d_out), W, None if bias is None else _check(bias, (d_out,), name),
                      f"L{layer} MLP {name}")
    _stale(model)


# ---- embeddings, norms -----------------------------------------------------------------------------

@torch.no_grad()
def set_embedding(model: LoadedModel, W_E: torch.Tensor, as_added: bool = False) -> None:
    """Token embedding `[vocab, d_model]` as stored; `as_added=True` divides by the family's embedding
    scale (Gemma: sqrt(d_model)), so that `W_E` is what the residual stream receives."""
    arch = _arch(model)
    weight = hf_module(model.bridge.embed).weight
    W = _check(W_E, tuple(weight.shape), "W_E").to(weight.dtype)
    weight.copy_(W / arch.embed_scale if as_added else W)
    _stale(model)


@torch.no_grad()
def zero_positions(model: LoadedModel) -> None:
    """Learned position embeddings (GPT-2) to zero: attention then matches on content only."""
    if hasattr(model.bridge, "pos_embed"):
        hf_module(model.bridge.pos_embed).weight.zero_()
        _stale(model)


@torch.no_grad()
def set_learned_positions(model: LoadedModel, W_pos: torch.Tensor) -> None:
    """The learned positional embedding `[n_ctx, d_model]` as stored (GPT-2; the planted CD-T model)."""
    arch = _arch(model)
    weight = arch.W_pos
    if weight is None:
        raise MissingComponentError(arch.name, "learned positional embedding")
    if tuple(W_pos.shape) != tuple(weight.shape):
        raise MissingComponentError(arch.name, f"positional embedding of shape {list(W_pos.shape)}",
                                    f"it is {list(weight.shape)}")
    hf_module(model.bridge.pos_embed).weight.copy_(W_pos.to(weight.dtype))
    _stale(model)


@torch.no_grad()
def set_unembedding(model: LoadedModel, rows: torch.Tensor, b_U: torch.Tensor | None = None) -> None:
    """The unembedding as stored, `[vocab, d_model]` (row t: the direction whose dot product is t's logit)."""
    module = hf_module(model.bridge.unembed)
    if module.weight.data_ptr() == hf_module(model.bridge.embed).weight.data_ptr():
        raise PlantError(f"{model.spec}: unembedding tied to the embedding; build it untied to write both.")
    module.weight.copy_(_check(rows, tuple(module.weight.shape), "W_U rows").to(module.weight.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_(torch.zeros_like(bias) if b_U is None else b_U)
    _stale(model)


def _norm_modules(model: LoadedModel) -> Iterator[tuple[str, int | None, nn.Module]]:
    arch = _arch(model)
    for layer, block in enumerate(arch.blocks):
        for name in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if name in block._modules:
                yield name, layer, hf_module(block._modules[name])
        for name in ("q_norm", "k_norm"):
            if name in block.attn._modules:
                yield name, layer, hf_module(block.attn._modules[name])
    yield "final", None, hf_module(model.bridge.ln_final)


@torch.no_grad()
def set_norm(model: LoadedModel, name: str, layer: int | None, weight: torch.Tensor | float,
             bias: torch.Tensor | float | None = None) -> None:
    """A norm's *effective* weight (Gemma stores w with 1 + w applied: the offset is handled here) and
    bias (LayerNorm). `name`: ln1 / ln2 / ln1_post / ln2_post / q_norm / k_norm, or 'final' (layer None)."""
    arch = _arch(model)
    norm = arch.final_norm if name == "final" else arch.norm(name, layer)
    if norm is None:
        raise PlantError(f"{model.spec}: layer {layer} has no {name}.")
    module = norm.module
    module.weight.copy_(torch.as_tensor(weight, dtype=module.weight.dtype).expand_as(module.weight) - norm.offset)
    existing = getattr(module, "bias", None)
    if isinstance(existing, torch.Tensor):
        existing.copy_(torch.as_tensor(0.0 if bias is None else bias, dtype=existing.dtype).expand_as(existing))
    elif bias is not None:
        raise PlantError(f"{model.spec}: {name} has no bias.")
    _stale(model)


def reset_norms(model: LoadedModel) -> None:
    """Every norm (block, QK and final) to effective weight 1 and bias 0."""
    for name, layer, _ in list(_norm_modules(model)):
        set_norm(model, name, layer, 1.0)


@torch.no_grad()
def zero_all(model: LoadedModel) -> None:
    """Every parameter to zero (split qkv copies included), then every norm to the identity."""
    for param in model.hf_model.parameters():
        param.zero_()
    reset_norms(model)
    _stale(model)
