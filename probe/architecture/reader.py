"""`Architecture`: the family facts of one loaded model, read through the bridge's adapter and the
Hugging Face modules under it (see the package docstring); `architecture(model)` builds it once per model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from probe.architecture.components import (
    ATTN_NORMS,
    BLOCK_NORMS,
    ArchitectureError,
    Attention,
    MissingComponentError,
    Mlp,
    Norm,
    Rotary,
    Tensor,
    _config_value,
    _read_norm,
    hf_module,
)
from probe.loaded import LoadedModel
from probe.placement import materialised, resident

class Architecture:
    """Family facts of one loaded model; build with `architecture(model)` (cached per model)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        bridge = model.bridge
        self.name = f"{model.spec} ({model.architecture})"
        self.family = model.architecture
        for needed in ("blocks", "embed", "ln_final", "unembed"):
            if not hasattr(bridge, needed):
                raise MissingComponentError(self.name, f"'{needed}' component in the bridge's adapter")
        self.blocks = list(bridge.blocks)
        for layer, block in enumerate(self.blocks):
            for needed in ("attn", "mlp"):
                if not hasattr(block, needed):
                    raise MissingComponentError(self.name, f"blocks.{layer}.{needed}")
            for needed in ("v", "o"):
                if not hasattr(block.attn, needed):
                    raise MissingComponentError(self.name, f"blocks.{layer}.attn.{needed} (value/output projection)")
        cfg = bridge.cfg
        self.n_layers, self.n_heads, self.n_kv_heads = model.n_layers, model.n_heads, model.n_kv_heads
        self.d_model, self.d_head = model.d_model, model.d_head
        self.block_kind = "parallel" if getattr(cfg, "parallel_attn_mlp", False) else "sequential"
        self.normalization = getattr(cfg, "normalization_type", None)
        self.positional = getattr(cfg, "positional_embedding_type", None)
        self.hf_config = model.hf_model.config
        self.kv_index = torch.tensor([model.kv_head_of(h) for h in range(self.n_heads)])
        softcap = _config_value(self.hf_config, "final_logit_softcapping")
        self.softcap_logits = float(softcap) if softcap else None

    # ---- heads ----------------------------------------------------------------------------------
    def kv_of(self, head: int) -> int:
        return int(self.kv_index[head])

    def _stacked(self, name: str) -> torch.Tensor | None:
        """The bridge's stack of one per-head weight over the layers (on the input device)."""
        if getattr(self.model, "offloaded", False):
            return self._stacked_offloaded(name)
        try:
            value = getattr(self.model.bridge, name)
        except AttributeError:  # the bridge raises for a bias-free checkpoint
            return None
        return None if value is None else value.detach()

    def _stacked_offloaded(self, name: str) -> torch.Tensor | None:
        """`_stacked` for a model whose weights accelerate offloaded (`meta` outside a forward): the
        bridge's own per-block reading, one block materialised at a time (never the whole model),
        each copy gathered onto the input device."""
        bridge = self.model.bridge
        reshape = {"W_Q": "_reshape_qkv", "W_K": "_reshape_qkv", "W_V": "_reshape_qkv", "W_O": "_reshape_o"}.get(name)
        reshape_fn = getattr(bridge, reshape) if reshape else (lambda w: w)
        home = torch.device(self.model.device)
        parts = []
        for block in self.blocks:
            with materialised(hf_module(block)):
                try:
                    value = getattr(block.attn, name)
                except AttributeError:
                    return None
                if value is None:
                    return None
                parts.append(reshape_fn(value.detach()).to(home, copy=True))
        return torch.stack(parts)

    @functools.cached_property
    def W_Q(self) -> torch.Tensor:
        """`[L, H, d_model, d_head]` (the bridge's stack; packed qkv already split)."""
        return self._required("W_Q")

    @functools.cached_property
    def W_K(self) -> torch.Tensor:
        """`[L, K, d_model, d_head]` per key/value head; `kv_of(h)` maps a query head to its row."""
        return self._required("W_K")

    @functools.cached_property
    def W_V(self) -> torch.Tensor:
        """`[L, K, d_model, d_head]` per key/value head."""
        return self._required("W_V")

    @functools.cached_property
    def W_O(self) -> torch.Tensor:
        """`[L, H, d_head, d_model]`."""
        return self._required("W_O")

    @property
    def W_K_per_query(self) -> torch.Tensor:
        """`[L, H, d_model, d_head]`: each query head's key weights (GQA expanded through `kv_index`)."""
        return self.W_K[:, self.kv_index]

    @property
    def W_V_per_query(self) -> torch.Tensor:
        """`[L, H, d_model, d_head]`: each query head's value weights (GQA expanded through `kv_index`)."""
        return self.W_V[:, self.kv_index]

    def OV(self, layer: int, head: int) -> torch.Tensor:
        """`[d_model, d_model]` OV matrix of one query head (row-vector convention: x @ W_V @ W_O)."""
        return self.W_V[layer, self.kv_of(head)].float() @ self.W_O[layer, head].float()

    @functools.cached_property
    def b_Q(self) -> torch.Tensor | None:
        return self._stacked("b_Q")

    @functools.cached_property
    def b_K(self) -> torch.Tensor | None:
        return self._stacked("b_K")

    @functools.cached_property
    def b_V(self) -> torch.Tensor | None:
        return self._stacked("b_V")

    @functools.cached_property
    def b_O(self) -> torch.Tensor | None:
        return self._stacked("b_O")

    def _required(self, name: str) -> torch.Tensor:
        value = self._stacked(name)
        if value is None:
            raise MissingComponentError(self.name, f"stacked {name} weights")
        return value

    # ---- norms ----------------------------------------------------------------------------------
    def norm(self, name: str, layer: int) -> Norm | None:
        """`ln1` (before attention), `ln2` (before the MLP), `ln1_post` / `ln2_post` (on the attention /
        MLP output, Gemma 2/3 and OLMo-2), `q_norm` / `k_norm` (QK-norm); None where the family has none."""
        if name not in BLOCK_NORMS + ATTN_NORMS:
            raise ArchitectureError(f"Unknown norm {name!r}; one of {BLOCK_NORMS + ATTN_NORMS}.")
        return self._norm(name, layer)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one Architecture per model, kept with it
    def _norm(self, name: str, layer: int) -> Norm | None:
        block = self.blocks[layer]
        parent, prefix = (block.attn, f"{block.name}.{block.attn.name}") if name in ATTN_NORMS else (block, block.name)
        component = getattr(parent, name, None) if name in parent._modules else None
        if component is None:
            return None
        return _read_norm(hf_module(component), f"{prefix}.{component.name}")

    @functools.cached_property
    def final_norm(self) -> Norm:
        bridge = self.model.bridge
        return _read_norm(hf_module(bridge.ln_final), bridge.ln_final.name)

    def placement(self, layer: int) -> str:
        """'pre' (Llama, GPT-2), 'post' (OLMo-2: norms on the sublayer outputs only) or 'both' (Gemma 2/3)."""
        pre = self.norm("ln1", layer) is not None
        post = self.norm("ln1_post", layer) is not None
        return "both" if pre and post else ("post" if post else "pre")

    def qk_norm(self, layer: int) -> str | None:
        """None, 'per-head' (Qwen3, Gemma 3: over d_head) or 'whole' (OLMo-2: over all heads' q)."""
        q_norm = self.norm("q_norm", layer)
        if q_norm is None:
            return None
        return "per-head" if q_norm.size == self.d_head else "whole"

    # ---- attention ------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)  # noqa: B019
    def attention(self, layer: int) -> Attention:
        block = self.blocks[layer]
        hf_attn = hf_module(block.attn)
        scaling = float(getattr(hf_attn, "scaling", self.d_head ** -0.5))
        softcap = getattr(hf_attn, "attn_logit_softcapping", None)
        window = getattr(hf_attn, "sliding_window", None)
        return Attention(scaling=scaling, softcap=float(softcap) if softcap else None,
                         window=int(window) if window else None,
                         o_path=f"{block.name}.{block.attn.name}.{block.attn.o.name}",
                         qkv_packed="qkv" in block.attn._modules)

    def unsupported_attention(self) -> str | None:
        """An attention variant that the stacked weights and `Attention` facts do not describe (a
        re-computation from them would get the scores wrong), named; None when there is none."""
        config = self.hf_config
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, flag, False):
                return f"attention with {flag}"
        if getattr(config, "alibi", False) or self.positional == "alibi":
            return "ALiBi positions"
        return None

    def rotary(self, layer: int) -> Rotary | None:
        """Rotated dims per head and theta; None for learned/absolute positions (GPT-2)."""
        if self.positional != "rotary":
            return None
        params = _config_value(self.hf_config, "rope_parameters") or {}
        hf_attn = hf_module(self.blocks[layer].attn)
        if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
            params = params.get(getattr(hf_attn, "layer_type", None) or "full_attention") or next(iter(params.values()))
        params = params if isinstance(params, dict) else {}
        dims = getattr(hf_attn, "rotary_ndims", None) or int(self.d_head * float(params.get("partial_rotary_factor", 1.0)))
        theta = params.get("rope_theta", _config_value(self.hf_config, "rope_theta"))
        return Rotary(dims=int(dims), theta=float(theta) if theta is not None else None)

    def rotary_key(self, layer: int) -> str | None:
        """Which rotary table a layer uses (its layer type where the family has several, e.g. Gemma 3's
        local/global bases), None without rotary."""
        if self.rotary(layer) is None:
            return None
        return getattr(hf_module(self.blocks[layer].attn), "layer_type", None) or "default"

    def rotary_tables(self, key: str, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin `[length, rotary_dims]` exactly as the model's rotary module returns them (scaling,
        attention factor and partial rotary included), float32."""
        module = self._rotary_module()
        positions = torch.arange(length, device=torch.device(self.model.device))[None]
        probe_x = torch.zeros(1, dtype=torch.float32, device=positions.device)
        takes_type = "layer_type" in inspect.signature(module.forward).parameters
        with torch.no_grad():
            cos, sin = module(probe_x, positions, key) if takes_type else module(probe_x, positions)
        return cos[0].float(), sin[0].float()

    def _rotary_module(self) -> nn.Module:
        cached = self.model.memo.get("_rotary_module")
        if cached is None:
            found = [m for m in self.model.hf_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
            if not found:
                raise MissingComponentError(self.name, "rotary embedding module")
            cached = found[0]
            self.model.memo["_rotary_module"] = cached
        return cached

    def attn_output_one_token(self, layer: int, x: torch.Tensor, heads: Sequence[int] | None = None) -> torch.Tensor:
        """What layer `layer`'s attention adds to the residual for a one-token context (the token sees
        only itself, and rotary is the identity at position 0): `sum_h v_kv(h) W_O[h] + b_O`, through the
        post-attention norm where the family has one. `x` `[n, d]` is the residual entering the layer;
        `heads` restricts the sum (None: every query head)."""
        ln1 = self.norm("ln1", layer)
        h_in = (ln1(x.to(ln1.weight.dtype)) if ln1 is not None else x).float()
        v = torch.einsum("nd,kde->nke", h_in, self.W_V[layer].float())
        if self.b_V is not None:
            v = v + self.b_V[layer].float()
        chosen = list(range(self.n_heads)) if heads is None else list(heads)
        z = v[:, self.kv_index[chosen]]                                          # [n, h, dh]
        out = torch.einsum("nhe,hed->nd", z, self.W_O[layer][chosen].float())
        if self.b_O is not None:
            out = out + self.b_O[layer].float()
        post = self.norm("ln1_post", layer)
        return post(out.to(post.weight.dtype)).float() if post is not None else out

    # ---- MLP ------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)  # noqa: B019
    def mlp(self, layer: int) -> Mlp:
        block = self.blocks[layer]
        component = block.mlp
        module = hf_module(component)
        cfg = self.model.bridge.cfg
        kind_name = type(component).__name__
        n_experts = getattr(cfg, "num_experts", None)
        if "MoE" in kind_name or (n_experts and "gate" in component._modules and "in" not in component._modules):
            kind = "moe"
        elif "gate" in component._modules or "Gate" in kind_name:
            kind = "gated"
        else:
            kind = "plain"
        return Mlp(kind, module, f"{block.name}.{component.name}", getattr(cfg, "act_fn", None),
                   n_experts if kind == "moe" else None,
                   getattr(cfg, "experts_per_token", None) if kind == "moe" else None,
                   component=component, owner=self.name, layer=layer)

    def mlp_block_output(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor | None = None) -> torch.Tensor:
        """What layer `layer`'s MLP adds to the residual: its norms around the MLP, on the residual `x`
        entering the layer (+ `attn_out` where the block is sequential; parallel blocks read `x`)."""
        h = x if (attn_out is None or self.block_kind == "parallel") else x + attn_out
        ln2 = self.norm("ln2", layer)
        if self.block_kind == "parallel" and ln2 is None:
            ln2 = self.norm("ln1", layer)  # a shared input norm (GPT-J style)
        h = h.to(self.model.dtype)  # the modules run in the model's dtype (bf16 models too)
        out = self.mlp(layer)(ln2(h) if ln2 is not None else h)
        post = self.norm("ln2_post", layer)
        return (post(out) if post is not None else out).float()

    # ---- embedding and unembedding --------------------------------------------------------------
    @functools.cached_property
    def _embedding(self) -> nn.Module:
        return hf_module(self.model.bridge.embed)

    @property
    def W_E(self) -> torch.Tensor:
        """`[vocab, d_model]` token embedding (no scale; see `embed_scale`)."""
        return resident(self._embedding, "weight")

    @functools.cached_property
    def embed_scale(self) -> float:
        """The factor the model multiplies token embeddings by (Gemma: sqrt(d_model)); 1 elsewhere."""
        scale = resident(self._embedding, "embed_scale")
        if scale is None:
            return 1.0
        return float(torch.as_tensor(scale).to(self._embedding.weight.dtype))

    @property
    def has_learned_positions(self) -> bool:
        return hasattr(self.model.bridge, "pos_embed")

    @property
    def W_pos(self) -> torch.Tensor | None:
        """The learned positional embedding `[n_ctx, d_model]` (GPT-2), None for rotary families."""
        if not self.has_learned_positions:
            return None
        return resident(hf_module(self.model.bridge.pos_embed), "weight")

    def embed(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Token embeddings as the model adds them to the residual stream (scale included, no positions)."""
        weight = self._embedding.weight
        device = weight.device if weight.device.type != "meta" else torch.device(self.model.device)
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        return self._embedding(ids)

    @functools.cached_property
    def _unembedding(self) -> nn.Module:
        return hf_module(self.model.bridge.unembed)

    def W_U_columns(self, ids: Sequence[int]) -> torch.Tensor:
        """Unembedding columns `[d_model, n]` of `ids` only, float32."""
        weight = resident(self._unembedding, "weight")
        return weight[torch.as_tensor(list(ids), device=weight.device)].T.float()

    @property
    def unembed_weight(self) -> torch.Tensor:
        """The unembedding matrix as stored, `[vocab, d_model]` (rows are W_U's columns)."""
        return resident(self._unembedding, "weight")

    @property
    def b_U(self) -> torch.Tensor | None:
        bias = resident(self._unembedding, "bias")
        return None if bias is None else bias.float()

    # ---- paths ----------------------------------------------------------------------------------
    def path(self, component: str, layer: int | None = None) -> str:
        """The Hugging Face module path of a component (`embed`, `ln_final`, `unembed`, `attn`, `attn.o`,
        `mlp`, a norm name), for finding the same module in another copy of the model."""
        bridge = self.model.bridge
        if layer is None:
            if not hasattr(bridge, component):
                raise MissingComponentError(self.name, component)
            return getattr(bridge, component).name
        block = self.blocks[layer]
        node, parts = block, [block.name]
        for part in component.split("."):
            if part not in node._modules:
                raise MissingComponentError(self.name, f"blocks.{layer}.{component}")
            node = node._modules[part]
            parts.append(node.name)
        return ".".join(parts)

    def summary(self) -> dict[str, Any]:
        """The facts as a plain dict (docs, the app, reports)."""
        rotary = self.rotary(0)
        return {
            "family": self.family, "block": self.block_kind, "norm": self.final_norm.kind,
            "placement": self.placement(0), "qk_norm": self.qk_norm(0),
            "gemma_offset": self.final_norm.offset, "rotary_dims": rotary.dims if rotary else None,
            "d_head": self.d_head, "mlp": self.mlp(0).kind, "qkv_fused": self.attention(0).qkv_packed,
            "n_kv_heads": self.n_kv_heads, "embed_scale": self.embed_scale,
            "softcap_attn": self.attention(0).softcap, "softcap_logits": self.softcap_logits,
            "windows": [self.attention(layer).window for layer in range(self.n_layers)],
        }


def architecture(model: LoadedModel, refresh: bool = False) -> Architecture:
    """The `Architecture` of a loaded model, built once and kept with it (`model.memo`).

    The stacked weights are read on first use and kept: after changing a model's weights in place
    (training), pass `refresh=True`."""
    cached = model.memo.get("_architecture")
    if refresh or cached is None or cached.model is not model:
        cached = Architecture(model)
        model.memo["_architecture"] = cached
    return cached
