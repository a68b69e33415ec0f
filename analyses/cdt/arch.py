"""CD-T's weight table, filled from the architecture layer (`probe.architecture.architecture(model)`).

CD-T needs every weight and constant of the forward pass as a value (norm eps and weights, attention
scale, soft-cap and window, rotary tables, MLP and expert weights) to re-run the model as two
streams. This module copies them out of the model's `Architecture` (MLP projections, MoE experts
and router, rotary tables and learned positions included) into `ArchWeights`, one layout for every
family: it names no Hugging Face module. What each family adds is a field:

| field | families |
|---|---|
| `b_Q/b_K/b_V` (q/k/v biases) | GPT-2, Qwen2, GPT-NeoX |
| `q_norm/k_norm`, `qk_norm_whole` | Gemma 3, Qwen3, Qwen3-MoE (per head); OLMo-2 (over the whole projection) |
| `ln1/ln2` None, `post_attn_norm/post_mlp_norm` | OLMo-2 (post-norms only); Gemma 2/3 have both |
| `attn_softcap`, `ArchWeights.logit_softcap` | Gemma 2 |
| `parallel` | GPT-NeoX (attention and MLP both read the block input) |
| `rotary_dims < d_head` | GPT-NeoX (partial rotary) |
| `moe` | Mixtral, Qwen3-MoE |

A model outside `FAMILIES` raises `UnsupportedArchitectureError` naming the families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from probe.architecture import Architecture, ArchitectureError, architecture
from probe.errors import ProbeError

# Hugging Face model classes CD-T has rules for and tests (tests/families/test_cdt_families.py) -> short name
FAMILIES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GPTNeoXForCausalLM": "gpt_neox",
}


class CDTError(ProbeError):
    """A CD-T request that cannot be carried out as asked."""


class UnsupportedArchitectureError(CDTError):
    """CD-T has decomposition rules for a fixed list of architectures only."""


@dataclass
class Norm:
    """A LayerNorm (`kind='layer'`) or RMSNorm (`kind='rms'`); `weight` is the effective multiplier."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass
class Moe:
    """A sparse MoE block: the model's router (run on the total) and the experts' gated-MLP weights."""

    route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    W_gate: torch.Tensor  # [E, d_model, d_mlp]
    W_up: torch.Tensor    # [E, d_model, d_mlp]
    W_down: torch.Tensor  # [E, d_mlp, d_model]
    act: Callable[[torch.Tensor], torch.Tensor]
    top_k: int
    renormalised: bool

    @property
    def n_experts(self) -> int:
        return int(self.W_gate.shape[0])


@dataclass
class LayerWeights:
    """One transformer block. Head weights are per head: W_Q `[H, d_model, d_head]`, W_K/W_V per KV head."""

    ln1: Norm | None  # None: no pre-attention norm (OLMo-2)
    W_Q: torch.Tensor
    b_Q: torch.Tensor | None
    W_K: torch.Tensor
    b_K: torch.Tensor | None
    W_V: torch.Tensor
    b_V: torch.Tensor | None
    W_O: torch.Tensor  # [H, d_head, d_model]
    b_O: torch.Tensor | None
    q_norm: Norm | None
    k_norm: Norm | None
    post_attn_norm: Norm | None
    ln2: Norm | None  # None: no pre-MLP norm (OLMo-2)
    W_in: torch.Tensor | None  # [d_model, d_mlp]  (the "up" projection for gated MLPs); None for MoE
    b_in: torch.Tensor | None
    W_gate: torch.Tensor | None  # [d_model, d_mlp] for gated MLPs, else None
    b_gate: torch.Tensor | None
    W_out: torch.Tensor | None  # [d_mlp, d_model]
    b_out: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor] | None
    post_mlp_norm: Norm | None
    attn_scale: float
    window: int | None  # sliding window length (key j visible to query i iff i - window < j <= i)
    rope_kind: str | None  # the rotary table this layer uses (None: no rotary)
    qk_norm_whole: bool = False  # q/k norms over all heads' concatenated projection (OLMo-2), not per head
    attn_softcap: float | None = None  # scores -> c·tanh(scores / c) before the mask (Gemma 2)
    parallel: bool = False  # attention and MLP both read the block input (GPT-NeoX)
    moe: Moe | None = None


@dataclass
class ArchWeights:
    """Everything CD-T needs to re-run the model as two streams."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    W_E: torch.Tensor  # [vocab, d_model], in the model's dtype (may be huge: cast rows on use)
    embed_scale: float
    W_pos: torch.Tensor | None  # [n_ctx, d_model] learned positions (GPT-2)
    layers: list[LayerWeights]
    ln_final: Norm
    W_U: torch.Tensor  # [d_model, vocab], in the model's dtype (cast the columns a metric needs)
    b_U: torch.Tensor | None
    logit_softcap: float | None
    rotary: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    dtype: torch.dtype = torch.float32
    _rope_cache: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def rope(self, kind: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[length, rotary_dims]` of the rotary table `kind` (cached per length)."""
        key = (kind, length)
        if key not in self._rope_cache:
            cos, sin = self.rotary(kind, length)  # type: ignore[misc]
            self._rope_cache[key] = (cos.to(self.dtype), sin.to(self.dtype))
        return self._rope_cache[key]


def _unsupported(model, why: str) -> UnsupportedArchitectureError:
    hf = getattr(model, "hf_model", None)
    supported = ", ".join(f"{cls} ({fam})" for cls, fam in FAMILIES.items())
    return UnsupportedArchitectureError(
        f"CD-T has no decomposition rules for {type(hf).__name__} ({getattr(model, 'spec', '?')}): {why}. "
        f"Supported architectures: {supported}. Each operation needs its own rule (see docs/cdt.md).")


def family_of(model) -> str:
    """The CD-T family of a loaded model, or a clear error naming what is supported."""
    name = type(getattr(model, "hf_model", None)).__name__
    if name not in FAMILIES or getattr(model, "bridge", None) is None:
        raise _unsupported(model, "not a family CD-T was built and tested for")
    return FAMILIES[name]


def _t(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.detach().to(dtype)


def _norm(spec, dtype: torch.dtype) -> Norm | None:
    """The architecture layer's `Norm` (effective weight: Gemma's 1 + w included) as CD-T's table entry."""
    if spec is None:
        return None
    return Norm(spec.kind, spec.weight.detach().to(dtype), _t(spec.bias, dtype), float(spec.eps))


def _layer(arch: Architecture, index: int, dtype: torch.dtype) -> LayerWeights:
    attention = arch.attention(index)
    rotary = arch.rotary(index)
    if rotary is not None and rotary.dims % 2:
        raise _unsupported(arch.model, f"layer {index} rotates an odd number of dims ({rotary.dims})")

    def stacked(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[index].detach().to(dtype)

    ln1, ln2 = _norm(arch.norm("ln1", index), dtype), _norm(arch.norm("ln2", index), dtype)
    parallel = arch.block_kind == "parallel"
    if parallel and ln2 is None:
        ln2 = ln1  # one input norm shared by both branches (GPT-J style)
    q_norm, k_norm = _norm(arch.norm("q_norm", index), dtype), _norm(arch.norm("k_norm", index), dtype)
    if (q_norm is None) != (k_norm is None):
        raise _unsupported(arch.model, f"layer {index} normalises only one of q and k")
    spec = arch.mlp(index)
    moe = dense = None
    if spec.kind == "moe":
        weights = spec.moe_weights()
        # views in the model's dtype (cast on use, as the dense MLPs): the experts are most of the weights
        moe = Moe(weights.route, weights.W_gate.to(dtype), weights.W_up.to(dtype), weights.W_down.to(dtype),
                  weights.act, weights.top_k, weights.renormalised)
    else:
        dense = spec.dense_weights()
    return LayerWeights(
        ln1=ln1, W_Q=stacked(arch.W_Q), b_Q=stacked(arch.b_Q), W_K=stacked(arch.W_K), b_K=stacked(arch.b_K),
        W_V=stacked(arch.W_V), b_V=stacked(arch.b_V), W_O=stacked(arch.W_O), b_O=stacked(arch.b_O),
        q_norm=q_norm, k_norm=k_norm, post_attn_norm=_norm(arch.norm("ln1_post", index), dtype), ln2=ln2,
        # transposed views, not copies (in the model's dtype): the MLPs are most of the weights
        # (318 MB of SmolLM2's)
        W_in=None if dense is None else dense.W_in.to(dtype), b_in=None if dense is None else _t(dense.b_in, dtype),
        W_gate=None if dense is None else _t(dense.W_gate, dtype),
        b_gate=None if dense is None else _t(dense.b_gate, dtype),
        W_out=None if dense is None else dense.W_out.to(dtype), b_out=None if dense is None else _t(dense.b_out, dtype),
        act=None if dense is None else dense.act, post_mlp_norm=_norm(arch.norm("ln2_post", index), dtype),
        attn_scale=float(attention.scaling), window=attention.window,
        rope_kind=arch.rotary_key(index),
        qk_norm_whole=arch.qk_norm(index) == "whole", attn_softcap=attention.softcap, parallel=parallel, moe=moe,
    )


def read_weights(model, dtype: torch.dtype = torch.float32) -> ArchWeights:
    """The model's weights as `ArchWeights` (float copies in `dtype` of the small tensors; the big
    matrices as views where `dtype` is the model's); the model is untouched."""
    family = family_of(model)
    try:
        arch = architecture(model)
        reason = arch.unsupported_attention()
        if reason:
            raise _unsupported(model, reason)
        # `Tensor.to(like)` takes like's dtype and device: every table lands on the input device, also the
        # layers of a model dispatched over several devices (a no-op view on a single-device model)
        like = torch.empty((), dtype=dtype, device=torch.device(model.device))
        layers = [_layer(arch, index, like) for index in range(arch.n_layers)]  # type: ignore[arg-type]
        W_pos = arch.W_pos
        ln_final = _norm(arch.final_norm, like)  # type: ignore[arg-type]
    except ArchitectureError as error:
        raise _unsupported(model, str(error)) from error

    def rotary(kind: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return arch.rotary_tables(kind, length)

    return ArchWeights(
        family=family, n_layers=arch.n_layers, n_heads=arch.n_heads, n_kv_heads=arch.n_kv_heads,
        d_head=arch.d_head, d_model=arch.d_model, W_E=arch.W_E, embed_scale=arch.embed_scale,
        W_pos=_t(W_pos, like), layers=layers, ln_final=ln_final,  # type: ignore[arg-type]
        W_U=arch.unembed_weight.T.to(like.device), b_U=_t(arch.b_U, like), logit_softcap=arch.softcap_logits,  # type: ignore[arg-type]
        rotary=rotary if any(layer.rope_kind for layer in layers) else None, dtype=dtype,
    )
