"""The two-stream forward pass: β (relevant) and γ (irrelevant) through every block of the model.

`Engine(model)` reads the weights once (`arch.read_weights`, through the architecture layer) and
re-runs the model's forward pass on pairs (β, γ) with the rules of `rules.py`: sequential or parallel
blocks, pre/post/no norms, QK-norm per head or over the whole projection, soft-capped attention,
partial rotary, dense (plain / gated) or MoE MLPs. Rows of a batch are independent: each row can carry
a different source (a token span, or a head at some positions), so one call decomposes many sources.

Hooks of the engine mirror TransformerLens names, so β + γ can be compared with the bridge's
`run_with_cache` at `hook_resid_pre/mid/post`, `hook_z`, `hook_pattern`, ... and the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from analyses.cdt import rules
from analyses.cdt.arch import ArchWeights, LayerWeights, read_weights
from analyses.cdt.rules import Pair



class Hooks:
    """Where a pass injects sources and reads targets (override what you need).

    `on_qkv(layer, q, k, v)` sees the projections (before q/k norms and rotary; k, v per KV head);
    `on_z(layer, z)` sees each head's output `[B, T, H, d_head]` and may return a re-split one.
    """

    def on_qkv(self, layer: int, q: Pair, k: Pair, v: Pair) -> None:
        return None

    def on_z(self, layer: int, z: Pair) -> Pair:
        return z


@dataclass(frozen=True)
class RuleOptions:
    """Choices where the paper's rules leave room (every choice keeps β + γ exact).

    attention: `paper` (β pattern from βq, βk) or `value_only` (pattern held at the true one).
    product: gated-MLP product rule, `relevant_only` | `symmetric` | `irrelevant_first` (rules.product).
    stabilise: the paper's sign stabiliser after the MLP projections and the MLP residual add.
    ln_bias: LayerNorm bias split, `input` (the authors' code: by |β|, |γ| of the norm's input) or
    `normalised` (by the normalised parts); RMSNorm has no bias, so it never matters there.
    """

    attention: str = "paper"
    product: str = "relevant_only"
    stabilise: bool = True
    ln_bias: str = "input"


DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Engine:
    """CD-T decomposition of one loaded model (weights read once, in float32 or float64)."""

    def __init__(self, model, dtype: str = "float32", options: RuleOptions | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}")
        self.model = model
        self.dtype = DTYPES[dtype]
        self.options = options or RuleOptions()
        self.w: ArchWeights = read_weights(model, self.dtype)
        self.device = self.w.W_E.device

    # ---- pieces ------------------------------------------------------------------------------------
    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The token part of the embedding `[B, T, d_model]` (scaled for Gemma)."""
        return self.w.W_E[ids].to(self.dtype) * self.w.embed_scale

    def position_embedding(self, length: int) -> torch.Tensor | None:
        return None if self.w.W_pos is None else self.w.W_pos[:length]

    def embed_pair(self, ids: torch.Tensor, relevant_positions: torch.Tensor | None = None) -> Pair:
        """Start state: γ = embedding (β = 0); token embeddings at `relevant_positions` `[B, T]` go to β.

        Learned positional embeddings always stay in γ (they carry no word).
        """
        tokens = self.token_embedding(ids)
        positions = self.position_embedding(ids.shape[1])
        if relevant_positions is None:
            beta = torch.zeros_like(tokens)
            gamma = tokens
        else:
            mask = relevant_positions.to(tokens.dtype)[..., None]
            beta, gamma = tokens * mask, tokens * (1 - mask)
        if positions is not None:
            gamma = gamma + positions
        return beta, gamma

    def _expand_kv(self, pair: Pair) -> Pair:
        g = self.w.group_size
        if g == 1:
            return pair
        return pair[0].repeat_interleave(g, dim=2), pair[1].repeat_interleave(g, dim=2)

    def _pre_norm(self, resid: Pair, spec) -> Pair:
        """A block's pre-norm; the identity where the family has none (OLMo-2 normalises outputs only)."""
        return resid if spec is None else rules.norm(resid, spec, self.options.ln_bias)

    def attention_block(self, index: int, resid: Pair, hooks: Hooks | None, record: dict | None) -> Pair:
        """ln1 → q/k/v (→ q/k norms → rotary) → attention → z hook → W_O (→ post-attn norm)."""
        lw: LayerWeights = self.w.layers[index]
        length = resid[0].shape[1]
        x = self._pre_norm(resid, lw.ln1)
        q = rules.linear_heads(x, lw.W_Q, lw.b_Q)
        k = rules.linear_heads(x, lw.W_K, lw.b_K)
        v = rules.linear_heads(x, lw.W_V, lw.b_V)
        if hooks is not None:
            hooks.on_qkv(index, q, k, v)
        if record is not None:
            record.update({f"blocks.{index}.ln1.hook_out": x, f"blocks.{index}.attn.hook_q": q,
                           f"blocks.{index}.attn.hook_k": k, f"blocks.{index}.attn.hook_v": v})
        if lw.q_norm is not None:
            whole = getattr(lw, "qk_norm_whole", False)
            q = rules.norm_heads(q, lw.q_norm, whole, self.options.ln_bias)
            k = rules.norm_heads(k, lw.k_norm, whole, self.options.ln_bias)  # type: ignore[arg-type]
        if lw.rope_kind is not None:
            cos, sin = self.w.rope(lw.rope_kind, length)
            q = rules.rotate(q, cos, sin)
            k = rules.rotate(k, cos, sin)
            if record is not None:
                record.update({f"blocks.{index}.attn.hook_rot_q": q, f"blocks.{index}.attn.hook_rot_k": k})
        visible = rules.attention_mask(length, lw.window, resid[0].device)
        z, pattern = rules.attention(q, self._expand_kv(k), self._expand_kv(v), lw.attn_scale, visible,
                                     self.options.attention, getattr(lw, "attn_softcap", None))
        if hooks is not None:
            z = hooks.on_z(index, z)
        if record is not None:
            record[f"blocks.{index}.attn.hook_pattern"] = (pattern, torch.zeros_like(pattern))
            record[f"blocks.{index}.attn.hook_z"] = z
        out = (torch.einsum("bthd,hdm->btm", z[0], lw.W_O), torch.einsum("bthd,hdm->btm", z[1], lw.W_O))
        out = rules.split_bias(out[0], out[1], lw.b_O)
        if lw.post_attn_norm is not None:
            out = rules.norm(out, lw.post_attn_norm, self.options.ln_bias)
        if record is not None:
            record[f"blocks.{index}.hook_attn_out"] = out
        return out

    def _stab(self, pair: Pair) -> Pair:
        return rules.stabilise(pair) if self.options.stabilise else pair

    def _gated(self, x: Pair, W_gate, b_gate, W_up, b_up, W_out, b_out, act) -> tuple[Pair, Pair, Pair, Pair]:
        """Gated MLP rule: gate and up linear (stabilised), activation on the gate, product, down
        (stabilised). Returns (out, gate, up, hidden)."""
        up = self._stab(rules.linear(x, W_up.to(self.dtype), b_up))
        gate = self._stab(rules.linear(x, W_gate.to(self.dtype), b_gate))
        hidden = rules.product(rules.activation(gate, act), up, self.options.product)
        return self._stab(rules.linear(hidden, W_out.to(self.dtype), b_out)), gate, up, hidden

    def moe(self, x: Pair, moe) -> Pair:
        """MoE rule: the router runs on the total (β + γ), as the attention pattern is the total's;
        each chosen expert follows the gated-MLP rule on (β, γ), and both parts are summed with the
        total's routing weights: Σ_e w_e(x)·(β_e + γ_e) = Σ_e w_e(x)·expert_e(x) = MoE(x)."""
        beta, gamma = x
        shape = beta.shape
        weights, chosen = moe.route((beta + gamma).reshape(-1, shape[-1]))
        dense = torch.zeros(weights.shape[0], moe.n_experts, dtype=self.dtype, device=beta.device)
        dense.scatter_(1, chosen.long(), weights.to(self.dtype))  # [N, E], 0 where not chosen
        dense = dense.reshape(*shape[:-1], moe.n_experts)
        out_b, out_g = torch.zeros_like(beta), torch.zeros_like(gamma)
        for expert in torch.nonzero(dense.reshape(-1, moe.n_experts).any(0)).flatten().tolist():
            (eb, eg), *_ = self._gated(x, moe.W_gate[expert], None, moe.W_up[expert], None, moe.W_down[expert],
                                       None, moe.act)
            w = dense[..., expert:expert + 1]
            out_b, out_g = out_b + w * eb, out_g + w * eg
        return out_b, out_g

    def mlp_block(self, index: int, resid: Pair, record: dict | None) -> Pair:
        """ln2 → W_in (and W_gate) → activation (→ product) → W_out (→ post-FF norm), stabilised;
        or the MoE rule."""
        lw = self.w.layers[index]
        x = self._pre_norm(resid, lw.ln2)
        moe = getattr(lw, "moe", None)
        up = hidden = pre = None
        if moe is not None:
            out = self.moe(x, moe)
        elif lw.W_gate is not None:
            out, pre, up, hidden = self._gated(x, lw.W_gate, lw.b_gate, lw.W_in, lw.b_in, lw.W_out, lw.b_out, lw.act)
        else:
            pre = self._stab(rules.linear(x, lw.W_in.to(self.dtype), lw.b_in))
            hidden = rules.activation(pre, lw.act)
            out = self._stab(rules.linear(hidden, lw.W_out.to(self.dtype), lw.b_out))
        if lw.post_mlp_norm is not None:
            out = rules.norm(out, lw.post_mlp_norm, self.options.ln_bias)
        if record is not None:
            record.update({f"blocks.{index}.ln2.hook_out": x, f"blocks.{index}.hook_mlp_out": out})
            inner = f"blocks.{index}.mlp"  # the bridge's hook names inside the MLP (none for MoE blocks)
            if moe is None:
                record.update({f"{inner}.hook_pre": pre, f"{inner}.hook_post": hidden})
            if lw.W_gate is not None and moe is None:
                record[f"{inner}.hook_pre_linear"] = up
        return out

    def block(self, index: int, resid: Pair, hooks: Hooks | None = None, record: dict | None = None) -> Pair:
        """Sequential: resid + attn → mid; mid + MLP(mid). Parallel (GPT-NeoX): both branches read the
        block input, resid + attn + MLP(resid). The stabiliser runs after the last add."""
        if record is not None:
            record[f"blocks.{index}.hook_resid_pre"] = resid
        attn = self.attention_block(index, resid, hooks, record)
        mid = (resid[0] + attn[0], resid[1] + attn[1])
        parallel = getattr(self.w.layers[index], "parallel", False)
        if record is not None and not parallel:
            record[f"blocks.{index}.hook_resid_mid"] = mid
        mlp = self.mlp_block(index, resid if parallel else mid, record)
        post = (mid[0] + mlp[0], mid[1] + mlp[1])
        if self.options.stabilise:
            post = rules.stabilise(post)
        if record is not None:
            record[f"blocks.{index}.hook_resid_post"] = post
        return post

    def apply_final_norm(self, resid: Pair, record: dict | None = None) -> Pair:
        out = rules.norm(resid, self.w.ln_final, self.options.ln_bias)
        if record is not None:
            record["ln_final.hook_out"] = out
        return out

    def unembed(self, normed: Pair, columns: torch.Tensor | None = None) -> Pair:
        """Decomposed logits at every position, only for `columns` (token ids) when given."""
        W = self.w.W_U if columns is None else self.w.W_U[:, columns]
        b = self.w.b_U if columns is None or self.w.b_U is None else self.w.b_U[columns]
        logits = rules.split_bias(normed[0] @ W.to(self.dtype), normed[1] @ W.to(self.dtype),
                                  None if b is None else b.to(self.dtype))
        if self.w.logit_softcap:
            cap = self.w.logit_softcap
            logits = rules.activation(logits, lambda x: torch.tanh(x / cap) * cap)
        return logits

    # ---- whole passes ------------------------------------------------------------------------------
    def propagate(self, resid: Pair, start_layer: int = 0, stop_layer: int | None = None,
                  hooks: Hooks | None = None, record: dict | None = None) -> Pair:
        """Run blocks `start_layer` … `stop_layer - 1` (all remaining by default) on a residual pair."""
        stop = self.w.n_layers if stop_layer is None else stop_layer
        for index in range(start_layer, stop):
            resid = self.block(index, resid, hooks, record)
        return resid

    @torch.no_grad()
    def decompose(self, ids: torch.Tensor, relevant_positions: torch.Tensor | None = None,
                  hooks: Hooks | None = None, record: bool = False,
                  columns: torch.Tensor | None = None) -> tuple[Pair, dict[str, Pair]]:
        """Full two-stream forward from the embeddings: returns (β_logits, γ_logits) and, if asked,
        every recorded hook as (β, γ)."""
        recorded: dict[str, Pair] | None = {} if record else None
        resid = self.embed_pair(ids.to(self.device), relevant_positions)
        if recorded is not None:
            recorded["hook_embed_total"] = resid
        resid = self.propagate(resid, 0, None, hooks, recorded)
        logits = self.unembed(self.apply_final_norm(resid, recorded), columns)
        return logits, recorded or {}
