"""Read a loaded model's weights into one plain table per architecture (no forked model code).

CD-T needs every weight and every constant of the forward pass (norm eps, attention scale, rotary
tables, window sizes) to re-run the model as two streams. This module reads them from the Hugging
Face modules of `model.hf_model` (the same tensors the bridge runs) into `ArchWeights`, a layout
that is the same for the three supported families:

| family  | HF classes                 | norms                      | MLP                     | positions |
|---------|----------------------------|----------------------------|-------------------------|-----------|
| gpt2    | GPT2LMHeadModel            | LayerNorm (eps from module)| GELU (tanh approx.)     | learned   |
| llama   | LlamaForCausalLM (SmolLM2) | RMSNorm                    | SwiGLU (SiLU gate × up) | RoPE      |
| gemma3  | Gemma3ForCausalLM          | RMSNorm with weight 1 + w, q/k norms, post-attn/post-FF norms | GeGLU | RoPE (local/global bases), sliding window |

Anything else raises `UnsupportedArchitectureError` naming these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from probe.errors import ProbeError

SUPPORTED = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
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
class LayerWeights:
    """One transformer block. Head weights are per head: W_Q `[H, d_model, d_head]`, W_K/W_V per KV head."""

    ln1: Norm
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
    ln2: Norm
    W_in: torch.Tensor  # [d_model, d_mlp]  (the "up" projection for gated MLPs)
    b_in: torch.Tensor | None
    W_gate: torch.Tensor | None  # [d_model, d_mlp] for gated MLPs, else None
    b_gate: torch.Tensor | None
    W_out: torch.Tensor  # [d_mlp, d_model]
    b_out: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    post_mlp_norm: Norm | None
    attn_scale: float
    window: int | None  # sliding window length (key j visible to query i iff i - window < j <= i)
    rope_kind: str | None  # the rotary table this layer uses (None: no rotary)


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
        """cos, sin `[length, d_head]` of the rotary table `kind` (cached per length)."""
        key = (kind, length)
        if key not in self._rope_cache:
            cos, sin = self.rotary(kind, length)  # type: ignore[misc]
            self._rope_cache[key] = (cos.to(self.dtype), sin.to(self.dtype))
        return self._rope_cache[key]


def family_of(model) -> str:
    """The CD-T family of a loaded model, or a clear error naming what is supported."""
    name = type(model.hf_model).__name__
    if name not in SUPPORTED:
        supported = ", ".join(f"{cls} ({fam})" for cls, fam in SUPPORTED.items())
        raise UnsupportedArchitectureError(
            f"CD-T has no decomposition rules for {name} ({model.spec}). Supported architectures: "
            f"{supported}. Each operation needs its own rule (see docs/cdt.md)."
        )
    return SUPPORTED[name]


def _t(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.detach().to(dtype)


def _per_head_in(weight: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """nn.Linear weight `[n*d_head, d_model]` → `[n, d_model, d_head]`."""
    return weight.T.reshape(weight.shape[1], n, d_head).permute(1, 0, 2).contiguous()


def _per_head_bias(bias: torch.Tensor | None, n: int, d_head: int) -> torch.Tensor | None:
    return None if bias is None else bias.reshape(n, d_head)


def _rms(module, dtype: torch.dtype, plus_one: bool) -> Norm:
    weight = module.weight.detach().to(dtype)
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    return Norm("rms", 1.0 + weight if plus_one else weight, None, eps)


def _layer_norm(module, dtype: torch.dtype) -> Norm:
    return Norm("layer", module.weight.detach().to(dtype), _t(module.bias, dtype), float(module.eps))


def read_weights(model, dtype: torch.dtype = torch.float32) -> ArchWeights:
    """Read `model.hf_model`'s weights into `ArchWeights` (a copy in `dtype`; the model is untouched)."""
    family = family_of(model)
    if family == "gpt2":
        return _read_gpt2(model, dtype)
    return _read_llama_like(model, dtype, gemma=(family == "gemma3"))


def _read_gpt2(model, dtype: torch.dtype) -> ArchWeights:
    hf = model.hf_model
    body = hf.transformer
    cfg = hf.config
    H, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // H
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        raise UnsupportedArchitectureError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                                           "reorder_and_upcast_attn are not supported by CD-T.")
    scale = d_head ** -0.5 if cfg.scale_attn_weights else 1.0
    layers = []
    for block in body.h:
        W = block.attn.c_attn.weight.detach().to(dtype)  # Conv1D: [d_model, 3*d_model]
        b = block.attn.c_attn.bias.detach().to(dtype)
        Wq, Wk, Wv = W.split(d_model, dim=1)
        bq, bk, bv = b.split(d_model)

        def heads(w: torch.Tensor) -> torch.Tensor:
            return w.reshape(d_model, H, d_head).permute(1, 0, 2).contiguous()

        W_O = block.attn.c_proj.weight.detach().to(dtype).reshape(H, d_head, d_model)
        layers.append(LayerWeights(
            ln1=_layer_norm(block.ln_1, dtype), W_Q=heads(Wq), b_Q=bq.reshape(H, d_head),
            W_K=heads(Wk), b_K=bk.reshape(H, d_head), W_V=heads(Wv), b_V=bv.reshape(H, d_head),
            W_O=W_O, b_O=_t(block.attn.c_proj.bias, dtype), q_norm=None, k_norm=None, post_attn_norm=None,
            ln2=_layer_norm(block.ln_2, dtype), W_in=block.mlp.c_fc.weight.detach().to(dtype),
            b_in=_t(block.mlp.c_fc.bias, dtype), W_gate=None, b_gate=None,
            W_out=block.mlp.c_proj.weight.detach().to(dtype), b_out=_t(block.mlp.c_proj.bias, dtype),
            act=block.mlp.act, post_mlp_norm=None, attn_scale=scale, window=None, rope_kind=None,
        ))
    return ArchWeights(
        family="gpt2", n_layers=len(layers), n_heads=H, n_kv_heads=H, d_head=d_head, d_model=d_model,
        W_E=body.wte.weight.detach(), embed_scale=1.0, W_pos=body.wpe.weight.detach().to(dtype),
        layers=layers, ln_final=_layer_norm(body.ln_f, dtype), W_U=hf.lm_head.weight.detach().T,
        b_U=_t(getattr(hf.lm_head, "bias", None), dtype), logit_softcap=None, dtype=dtype,
    )


def _read_llama_like(model, dtype: torch.dtype, gemma: bool) -> ArchWeights:
    hf = model.hf_model
    body = hf.model
    cfg = hf.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    d_model = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d_model // H
    layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise UnsupportedArchitectureError("Attention logit soft-capping is not supported by CD-T.")
    layers = []
    for index, block in enumerate(body.layers):
        attn, mlp = block.self_attn, block.mlp
        window = None
        if gemma and layer_types[index] == "sliding_attention":
            window = int(cfg.sliding_window)
        elif not gemma and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            window = int(cfg.sliding_window)
        layers.append(LayerWeights(
            ln1=_rms(block.input_layernorm, dtype, gemma),
            W_Q=_per_head_in(attn.q_proj.weight.detach().to(dtype), H, d_head),
            b_Q=_per_head_bias(_t(attn.q_proj.bias, dtype), H, d_head),
            W_K=_per_head_in(attn.k_proj.weight.detach().to(dtype), KV, d_head),
            b_K=_per_head_bias(_t(attn.k_proj.bias, dtype), KV, d_head),
            W_V=_per_head_in(attn.v_proj.weight.detach().to(dtype), KV, d_head),
            b_V=_per_head_bias(_t(attn.v_proj.bias, dtype), KV, d_head),
            W_O=attn.o_proj.weight.detach().to(dtype).T.reshape(H, d_head, d_model).contiguous(),
            b_O=_t(attn.o_proj.bias, dtype),
            q_norm=_rms(attn.q_norm, dtype, True) if gemma else None,
            k_norm=_rms(attn.k_norm, dtype, True) if gemma else None,
            post_attn_norm=_rms(block.post_attention_layernorm, dtype, True) if gemma else None,
            ln2=_rms(block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm, dtype, gemma),
            # transposed views, not copies (in the model's dtype): the MLPs are most of the weights
            # (318 MB of SmolLM2's), and a copy made CD-T the largest analyzer of the quick scan
            W_in=mlp.up_proj.weight.detach().to(dtype).T, b_in=_t(mlp.up_proj.bias, dtype),
            W_gate=mlp.gate_proj.weight.detach().to(dtype).T, b_gate=_t(mlp.gate_proj.bias, dtype),
            W_out=mlp.down_proj.weight.detach().to(dtype).T, b_out=_t(mlp.down_proj.bias, dtype),
            act=mlp.act_fn, post_mlp_norm=_rms(block.post_feedforward_layernorm, dtype, True) if gemma else None,
            attn_scale=float(attn.scaling), window=window, rope_kind=layer_types[index] if gemma else "default",
        ))
    rotary_module = body.rotary_emb

    def rotary(kind: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=body.embed_tokens.weight.device)[None]
        probe_x = torch.zeros(1, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            if gemma:
                cos, sin = rotary_module(probe_x, positions, kind)
            else:
                cos, sin = rotary_module(probe_x, positions)
        return cos[0], sin[0]

    embed_scale = float(getattr(body.embed_tokens, "scalar_embed_scale", 1.0)) if gemma else 1.0
    if gemma:  # the model multiplies by the scale cast to the weight dtype; do the same
        embed_scale = float(body.embed_tokens.embed_scale.to(body.embed_tokens.weight.dtype))
    softcap = getattr(cfg, "final_logit_softcapping", None)
    lm_head = hf.lm_head
    return ArchWeights(
        family="gemma3" if gemma else "llama", n_layers=len(layers), n_heads=H, n_kv_heads=KV, d_head=d_head,
        d_model=d_model, W_E=body.embed_tokens.weight.detach(), embed_scale=embed_scale, W_pos=None,
        layers=layers, ln_final=_rms(body.norm, dtype, gemma), W_U=lm_head.weight.detach().T,
        b_U=_t(getattr(lm_head, "bias", None), dtype), logit_softcap=float(softcap) if softcap else None,
        rotary=rotary, dtype=dtype,
    )
