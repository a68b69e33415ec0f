"""The fast sweep: propagate only β, reading the total (β + γ) from one cached clean pass.

Why it is exact: every CD-T rule keeps β + γ equal to the real activation, so γ never has to be
carried: wherever a rule needs γ it is `total − β`, and the total is the clean activation of the
prompt, the same for every source. The β stream carries one row per (source head, prompt); the
totals are computed once per prompt batch (P rows) and broadcast. Per rule:

| rule | β' from β and the cached total |
|---|---|
| linear (no bias) | βW (no γ needed) |
| linear with bias | βW + b·|βW| / (|βW| + |tW − βW| + tol) |
| RMSNorm | β·w / rms(total) |
| LayerNorm | (β − mean β)·w / σ(total) + b·|β| / (|β| + |t − β| + tol) (`ln_bias="normalised"`: as linear) |
| rotary | rotation of β |
| attention (`paper`) | softmax(mask(βq βkᵀ·s)) βv ; (`value_only`) P βv with P the clean pattern |
| activation | act(t) − act(t − β) |
| product | βa βu (`relevant_only`); the other options with γ = t − β |
| stabiliser | the paper's rule with γ = t − β |
| attention soft-cap | the cap on β's scores and on the clean scores, before the mask |
| QK-norm (per head / whole projection), no pre-norm, post-norms | the norm rule (none: identity) |
| parallel block | the MLP reads β of the block input, not of resid_mid |
| MoE | routing from the clean total (cached); each chosen expert's gated rule, weighted by it |

Compared with the two-stream `Engine` this drops the γ matmuls, the total-pattern softmax and the
total MLP per row (about half the work) and starts each source layer at its source heads' z. The
result equals `circuits.sweep` (the two-stream reference) up to float rounding; tests check that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyses.cdt import rules
from analyses.cdt.arch import LayerWeights, Norm
from analyses.cdt.circuits import COMPONENTS, Sweep, SweepActivations
from analyses.cdt.engine import DTYPES, Engine, RuleOptions
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.parallel import map_items

Tensor = torch.Tensor


# ---- β-only rules (β `[S, P, ...]`, totals `[P, ...]`, broadcast over S) -------------------------

def _share(y_beta: Tensor, y_total_no_bias: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return y_beta
    y_gamma = y_total_no_bias - y_beta
    return y_beta + bias * y_beta.abs() / (y_beta.abs() + y_gamma.abs() + rules.TOL)


def _norm_total(total: Tensor, spec: Norm) -> tuple[Tensor, Tensor]:
    """(normalised total before the bias, 1/scale) of a norm's input."""
    if spec.kind == "rms":
        inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + spec.eps)
        return total * inv * spec.weight, inv
    inv = torch.rsqrt(total.var(-1, keepdim=True, unbiased=False) + spec.eps)
    return (total - total.mean(-1, keepdim=True)) * inv * spec.weight, inv


def _norm_beta(beta: Tensor, normed_no_bias: Tensor, inv: Tensor, spec: Norm, total_in: Tensor,
               ln_bias: str = "input") -> Tensor:
    """β after a norm; LayerNorm bias split by |β|, |total_in − β| (`input`) or the normalised parts."""
    if spec.kind == "rms":
        return beta * inv * spec.weight
    beta_n = (beta - beta.mean(-1, keepdim=True)) * inv * spec.weight
    if spec.bias is None or ln_bias == "normalised":
        return _share(beta_n, normed_no_bias, spec.bias)
    if ln_bias != "input":
        raise ValueError(f"unknown LayerNorm bias split {ln_bias!r}; choose one of {rules.LN_BIAS_SPLITS}")
    gamma = total_in - beta
    return beta_n + spec.bias * beta.abs() / (beta.abs() + gamma.abs() + rules.TOL)


def _activation_beta(beta: Tensor, total: Tensor, act: Callable[[Tensor], Tensor],
                     act_total: Tensor | None = None) -> Tensor:
    """β after an elementwise activation, irrelevant part first: act(t) − act(t − β)."""
    return (act(total) if act_total is None else act_total) - act(total - beta)


def _attention_beta(q_b: Tensor, k_b: Tensor, v_b: Tensor, pattern: Tensor, scale: float,
                    visible: Tensor, rule: str, cap: float | None = None) -> Tensor:
    """β of z from β of q and of k, v (already expanded to query heads) and the clean pattern; the
    β scores pass the model's logit soft-cap `cap` (Gemma 2) as the total's do."""
    if rule == "paper":
        neg = torch.finfo(q_b.dtype).min
        scores = rules.softcap(torch.einsum("...qhd,...khd->...hqk", q_b, k_b) * scale, cap)
        beta_pattern = torch.softmax(scores.masked_fill(~visible, neg), dim=-1)
        return torch.einsum("...hqk,...khd->...qhd", beta_pattern, v_b)
    if rule == "value_only":
        return torch.einsum("...hqk,...khd->...qhd", pattern, v_b)
    raise ValueError(f"unknown attention rule {rule!r}")


def _stabilise(beta: Tensor, total: Tensor) -> Tensor:
    """β after the paper's stabiliser (where β·γ < 0 the larger part takes the sum), γ = total − β."""
    gamma = total - beta
    opposite = (beta * gamma) < 0
    beta_wins = beta.abs() >= gamma.abs()
    return torch.where(opposite, total * beta_wins, beta)


def _product(beta_a: Tensor, total_a: Tensor, beta_b: Tensor, total_b: Tensor, mode: str) -> Tensor:
    if mode == "relevant_only":
        return beta_a * beta_b
    gamma_a, gamma_b = total_a - beta_a, total_b - beta_b
    if mode == "symmetric":
        return beta_a * beta_b + 0.5 * (beta_a * gamma_b + gamma_a * beta_b)
    if mode == "irrelevant_first":
        return total_a * total_b - gamma_a * gamma_b
    raise ValueError(f"unknown product rule {mode!r}")


class FastHooks:
    """Sources and targets of a β-only pass. `on_qkv` sees β of q (per query head) and k, v (per KV
    head) `[S, P, T, heads, d_head]`; `on_z(layer, beta_z, total_z)` may return a new β of z (or None)."""

    def on_qkv(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        return None

    def on_z(self, layer: int, beta: Tensor | None, total: Tensor) -> Tensor | None:
        return beta


class BetaPass:
    """β-only CD-T propagation for one prompt batch, with the clean totals cached per layer."""

    def __init__(self, engine: Engine, ids: Tensor) -> None:
        self.engine, self.w, self.options = engine, engine.w, engine.options
        self.memo: dict[tuple[int, str], Tensor] = {}
        resid = engine.embed_pair(ids.to(engine.device))[1]
        with torch.no_grad():
            for index in range(self.w.n_layers):  # fill the totals once (β = None: totals only)
                self.memo[(index, "resid_pre")] = resid
                _, resid = self.layer(index, None, None)
        self.final_total = resid

    def _expand(self, x: Tensor) -> Tensor:
        g = self.w.group_size
        return x if g == 1 else x.repeat_interleave(g, dim=-2)

    def _total(self, index: int, name: str, make: Callable[[], Tensor]) -> Tensor:
        key = (index, name)
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def _linear(self, index: int, name: str, beta: Tensor | None, total_in: Tensor, W: Tensor,
                b: Tensor | None, heads: bool = False) -> tuple[Tensor | None, Tensor]:
        def project(x: Tensor) -> Tensor:
            return torch.einsum("...tm,hmd->...thd", x, W) if heads else x @ W

        no_bias = self._total(index, name + ".nb", lambda: project(total_in))
        total = self._total(index, name, lambda: no_bias if b is None else no_bias + b)
        return (None if beta is None else _share(project(beta), no_bias, b)), total

    def _norm(self, index: int, name: str, beta: Tensor | None, total_in: Tensor,
              spec: Norm | None, whole: bool = False) -> tuple[Tensor | None, Tensor]:
        """The norm rule (`spec` None: no norm, the identity); `whole`: over the last two dims at once
        (OLMo-2's q/k norm over the whole projection)."""
        if spec is None:
            return beta, total_in
        if whole:
            shape = total_in.shape
            flat_b, flat_t = self._norm(index, name + ".flat", None if beta is None else beta.flatten(-2),
                                        total_in.flatten(-2), spec)
            return (None if flat_b is None else flat_b.reshape(beta.shape)), flat_t.reshape(shape)  # type: ignore[union-attr]
        normed, inv = self._total(index, name + ".nb", lambda: _norm_total(total_in, spec))  # type: ignore[arg-type,return-value]
        total = self._total(index, name, lambda: normed if spec.bias is None else normed + spec.bias)
        return (None if beta is None else _norm_beta(beta, normed, inv, spec, total_in, self.options.ln_bias)), total

    def _stab(self, beta: Tensor | None, total: Tensor) -> Tensor | None:
        if beta is None or not self.options.stabilise:
            return beta
        return _stabilise(beta, total)

    def attention(self, index: int, beta: Tensor | None, hooks: FastHooks | None) -> tuple[Tensor | None, Tensor]:
        lw: LayerWeights = self.w.layers[index]
        resid = self.memo[(index, "resid_pre")]
        length = resid.shape[-2]
        x_b, x_t = self._norm(index, "ln1", beta, resid, lw.ln1)
        q_b, q_t = self._linear(index, "q", x_b, x_t, lw.W_Q, lw.b_Q, heads=True)
        k_b, k_t = self._linear(index, "k", x_b, x_t, lw.W_K, lw.b_K, heads=True)
        v_b, v_t = self._linear(index, "v", x_b, x_t, lw.W_V, lw.b_V, heads=True)
        if hooks is not None and q_b is not None:
            hooks.on_qkv(index, q_b, k_b, v_b)  # type: ignore[arg-type]
        if lw.q_norm is not None:
            whole = getattr(lw, "qk_norm_whole", False)
            q_b, q_t = self._norm(index, "q_norm", q_b, q_t, lw.q_norm, whole)
            k_b, k_t = self._norm(index, "k_norm", k_b, k_t, lw.k_norm, whole)  # type: ignore[arg-type]
        if lw.rope_kind is not None:
            cos, sin = self.w.rope(lw.rope_kind, length)
            q_t = self._total(index, "rot_q", lambda: rules.rotate((q_t, q_t), cos, sin)[0])
            k_t = self._total(index, "rot_k", lambda: rules.rotate((k_t, k_t), cos, sin)[0])
            if q_b is not None:
                q_b, k_b = rules.rotate((q_b, k_b), cos, sin)
        visible = rules.attention_mask(length, lw.window, resid.device)
        neg = torch.finfo(resid.dtype).min
        cap = getattr(lw, "attn_softcap", None)

        def clean_pattern() -> Tensor:
            scores = rules.softcap(torch.einsum("...qhd,...khd->...hqk", q_t, self._expand(k_t)) * lw.attn_scale, cap)
            return torch.softmax(scores.masked_fill(~visible, neg), dim=-1)

        pattern = self._total(index, "pattern", clean_pattern)
        z_t = self._total(index, "z", lambda: torch.einsum("...hqk,...khd->...qhd", pattern, self._expand(v_t)))
        z_b = None
        if q_b is not None:
            k_b, v_b = self._expand(k_b), self._expand(v_b)  # type: ignore[arg-type]
            z_b = _attention_beta(q_b, k_b, v_b, pattern, lw.attn_scale, visible, self.options.attention, cap)
        if hooks is not None:
            z_b = hooks.on_z(index, z_b, z_t)
        out_no_bias = self._total(index, "attn.nb", lambda: torch.einsum("...thd,hdm->...tm", z_t, lw.W_O))
        out_t = self._total(index, "attn", lambda: out_no_bias if lw.b_O is None else out_no_bias + lw.b_O)
        out_b = None if z_b is None else _share(torch.einsum("...thd,hdm->...tm", z_b, lw.W_O), out_no_bias, lw.b_O)
        if lw.post_attn_norm is not None:
            out_b, out_t = self._norm(index, "post_attn", out_b, out_t, lw.post_attn_norm)
        return out_b, out_t

    def _gated(self, index: int, tag: str, x_b: Tensor | None, x_t: Tensor, W_gate: Tensor, b_gate: Tensor | None,
               W_up: Tensor, b_up: Tensor | None, W_out: Tensor, b_out: Tensor | None,
               act: Callable[[Tensor], Tensor]) -> tuple[Tensor | None, Tensor]:
        """The gated-MLP rule (up, gate stabilised; activation on the gate; product; down stabilised)."""
        dtype = self.engine.dtype
        up_b, up_t = self._linear(index, "up" + tag, x_b, x_t, W_up.to(dtype), b_up)
        up_b = self._stab(up_b, up_t)
        gate_b, gate_t = self._linear(index, "gate" + tag, x_b, x_t, W_gate.to(dtype), b_gate)
        gate_b = self._stab(gate_b, gate_t)
        act_t = self._total(index, "act" + tag, lambda: act(gate_t))
        act_b = None if gate_b is None else _activation_beta(gate_b, gate_t, act, act_t)
        hidden_t = self._total(index, "hidden" + tag, lambda: act_t * up_t)
        hidden_b = None if act_b is None else _product(act_b, act_t, up_b, up_t, self.options.product)  # type: ignore[arg-type]
        out_b, out_t = self._linear(index, "down" + tag, hidden_b, hidden_t, W_out.to(dtype), b_out)
        return self._stab(out_b, out_t), out_t

    def _moe(self, index: int, tag: str, x_b: Tensor | None, x_t: Tensor, moe) -> tuple[Tensor | None, Tensor]:
        """The MoE rule with β only: routing from the cached total, each chosen expert's gated rule,
        summed with the total's routing weights (see `Engine.moe`)."""
        def routing() -> Tensor:
            weights, chosen = moe.route(x_t.reshape(-1, x_t.shape[-1]))
            dense = torch.zeros(weights.shape[0], moe.n_experts, dtype=x_t.dtype, device=x_t.device)
            dense.scatter_(1, chosen.long(), weights.to(x_t.dtype))
            return dense.reshape(*x_t.shape[:-1], moe.n_experts)

        dense = self._total(index, "route" + tag, routing)
        parts = []
        for expert in torch.nonzero(dense.reshape(-1, moe.n_experts).any(0)).flatten().tolist():
            e_b, e_t = self._gated(index, f"{tag}.e{expert}", x_b, x_t, moe.W_gate[expert], None, moe.W_up[expert],
                                   None, moe.W_down[expert], None, moe.act)
            parts.append((dense[..., expert:expert + 1], e_b, e_t))
        out_t = self._total(index, "moe" + tag, lambda: sum(w * e_t for w, _, e_t in parts))
        out_b = None if x_b is None else sum(w * e_b for w, e_b, _ in parts)
        return out_b, out_t  # type: ignore[return-value]

    def mlp(self, index: int, beta: Tensor | None, total_in: Tensor, tag: str = "") -> tuple[Tensor | None, Tensor]:
        """ln2 → up (and gate) → activation (→ product) → down, or the MoE rule; `tag` keys a position
        slice's totals."""
        lw = self.w.layers[index]
        x_b, x_t = self._norm(index, "ln2" + tag, beta, total_in, lw.ln2)
        moe = getattr(lw, "moe", None)
        if moe is not None:
            out_b, out_t = self._moe(index, tag, x_b, x_t, moe)
        elif lw.W_gate is not None:
            out_b, out_t = self._gated(index, tag, x_b, x_t, lw.W_gate, lw.b_gate, lw.W_in, lw.b_in, lw.W_out,
                                       lw.b_out, lw.act)
        else:
            up_b, up_t = self._linear(index, "up" + tag, x_b, x_t, lw.W_in, lw.b_in)
            up_b = self._stab(up_b, up_t)
            hidden_t = self._total(index, "hidden" + tag, lambda: lw.act(up_t))
            hidden_b = None if up_b is None else _activation_beta(up_b, up_t, lw.act, hidden_t)
            out_b, out_t = self._linear(index, "down" + tag, hidden_b, hidden_t, lw.W_out, lw.b_out)
            out_b = self._stab(out_b, out_t)
        if lw.post_mlp_norm is not None:
            out_b, out_t = self._norm(index, "post_mlp" + tag, out_b, out_t, lw.post_mlp_norm)
        return out_b, out_t

    def layer(self, index: int, beta: Tensor | None, hooks: FastHooks | None) -> tuple[Tensor | None, Tensor]:
        """One block: β of resid_pre (or None: nothing relevant yet) → β of resid_post, and the total.
        Parallel blocks (GPT-NeoX) feed the MLP the block input instead of resid_mid."""
        attn_b, attn_t = self.attention(index, beta, hooks)
        resid_t = self.memo[(index, "resid_pre")]
        mid_t = self._total(index, "mid", lambda: resid_t + attn_t)
        mid_b = attn_b if beta is None else (beta if attn_b is None else beta + attn_b)
        parallel = getattr(self.w.layers[index], "parallel", False)
        mlp_b, mlp_t = self.mlp(index, beta if parallel else mid_b, resid_t if parallel else mid_t)
        post_t = self._total(index, "post", lambda: mid_t + mlp_t)
        if mid_b is None:
            post_b = None
        else:
            post_b = mid_b if mlp_b is None else mid_b + mlp_b
        return self._stab(post_b, post_t), post_t

    def run(self, start_layer: int, hooks: FastHooks) -> Tensor | None:
        """Layers `start_layer`… with β = None until a hook injects a source; returns β of the final
        resid at the last position `[S, P, 1, d]` (the last layer's attention runs at every position,
        for its targets; its MLP only where the output is read)."""
        beta = None
        last = self.w.n_layers - 1
        for index in range(start_layer, last):
            beta, _ = self.layer(index, beta, hooks)
        attn_b, attn_t = self.attention(last, beta, hooks)
        resid_t = self.memo[(last, "resid_pre")]
        mid_t = self._total(last, "mid", lambda: resid_t + attn_t)[..., -1:, :]
        mid_b = attn_b if beta is None else (beta if attn_b is None else beta + attn_b)
        if mid_b is None:
            return None
        mid_b = mid_b[..., -1:, :]
        if getattr(self.w.layers[last], "parallel", False):
            in_b = None if beta is None else beta[..., -1:, :]
            mlp_b, mlp_t = self.mlp(last, in_b, resid_t[..., -1:, :], tag="@last")
        else:
            mlp_b, mlp_t = self.mlp(last, mid_b, mid_t, tag="@last")
        return self._stab(mid_b if mlp_b is None else mid_b + mlp_b, mid_t + mlp_t)

    def logit_diff_beta(self, beta: Tensor, good: Tensor, bad: Tensor) -> Tensor:
        """β of logit(good) − logit(bad) at the last position, `[S, P]`."""
        total = self.final_total[..., -1, :]
        normed, inv = _norm_total(total, self.w.ln_final)
        nb = _norm_beta(beta[..., -1, :], normed, inv, self.w.ln_final, total, self.options.ln_bias)  # [S, P, d]
        columns = torch.stack([good, bad], dim=1).to(self.engine.device)  # [P, 2]
        W = self.w.W_U[:, columns].to(self.engine.dtype)  # [d, P, 2]
        total_n = normed if self.w.ln_final.bias is None else normed + self.w.ln_final.bias
        lb = torch.einsum("spd,dpc->spc", nb, W)
        lt = torch.einsum("pd,dpc->pc", total_n, W)
        if self.w.b_U is not None:
            lb = _share(lb, lt, self.w.b_U[columns].to(self.engine.dtype))
            lt = lt + self.w.b_U[columns].to(self.engine.dtype)
        if self.w.logit_softcap:
            cap = self.w.logit_softcap
            soft = lambda x: torch.tanh(x / cap) * cap  # noqa: E731
            lb = _activation_beta(lb, lt, soft)
        return lb[..., 0] - lb[..., 1]


def _normalised_dot(beta: Tensor, deviation: Tensor) -> Tensor:
    """β `[S, P, T, H, d]`, deviation `[P, T, H, d]` → `[S, P, H]`: dot / ‖deviation‖² per head."""
    dots = torch.einsum("spthd,pthd->sph", beta, deviation)
    return dots / deviation.pow(2).sum((1, 3)).clamp_min(1e-12)


class _SweepHooks(FastHooks):
    """All heads of `layer` as sources (one row group each); relevance read at every later head."""

    def __init__(self, layer: int, activations: SweepActivations, n_heads: int) -> None:
        self.layer, self.activations, self.n_heads = layer, activations, n_heads
        self.to_z: dict[int, Tensor] = {}
        self.to_input: dict[str, dict[int, Tensor]] = {c: {} for c in COMPONENTS}
        self.deviation = {c: [a - m for a, m in zip(activations.qkv[c], activations.qkv_mean[c])] for c in COMPONENTS}
        self.z_deviation = [a - m for a, m in zip(activations.z, activations.z_mean)]

    def on_qkv(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        if layer > self.layer:
            for name, beta in (("q", q), ("k", k), ("v", v)):
                self.to_input[name][layer] = _normalised_dot(beta, self.deviation[name][layer])

    def on_z(self, layer: int, beta: Tensor | None, total: Tensor) -> Tensor | None:
        if layer == self.layer:
            H = self.n_heads
            injected = torch.zeros((H, *total.shape), dtype=total.dtype, device=total.device)
            heads = torch.arange(H)
            injected[heads, :, :, heads] = (total - self.activations.z_mean[layer]).permute(2, 0, 1, 3)
            return injected
        if layer > self.layer and beta is not None:
            self.to_z[layer] = _normalised_dot(beta, self.z_deviation[layer])
        return beta


def engine_sweep_activations(engine: Engine, clean: BetaPass, batch: LogitDiffBatch) -> SweepActivations:
    """The clean activations and their means a sweep needs, from the engine's own forward passes
    (no bridge caches): clean q/k/v (before q/k norms and rotary) and z, and their means over the
    mean-source prompts. Equal to `circuits.sweep_activations` up to float rounding."""
    mean_pass = BetaPass(engine, batch.mean_source_ids)
    L = engine.w.n_layers
    return SweepActivations(
        resid_pre=[clean.memo[(l, "resid_pre")] for l in range(L)],
        z=[clean.memo[(l, "z")] for l in range(L)],
        z_mean=[mean_pass.memo[(l, "z")].mean(0) for l in range(L)],
        qkv={c: [clean.memo[(l, c)] for l in range(L)] for c in COMPONENTS},
        qkv_mean={c: [mean_pass.memo[(l, c)].mean(0) for l in range(L)] for c in COMPONENTS},
    )


@dataclass
class SweepItem:
    """One (batch, source layer) pass of `fast_sweep`, a shard item of `probe.parallel.map_items`.

    In the caller's process it carries the caller's clean pass and sweep activations; pickled for another
    process it carries what rebuilds them there (the engine's settings and the batch): the same code
    on the same weights, so the same bits at the same thread count.
    """

    dtype: str
    options: RuleOptions
    batch: LogitDiffBatch
    layer: int
    passer: BetaPass | None = None
    activations: SweepActivations | None = None

    def __getstate__(self) -> dict[str, Any]:  # the clean totals stay behind: rebuilt where the item runs
        return {**self.__dict__, "passer": None, "activations": None}


SweepPart = tuple[Tensor, dict[int, Tensor], dict[str, dict[int, Tensor]]]  # to_output row, to_z, to_input
_REBUILT: dict[tuple, tuple[BetaPass, SweepActivations]] = {}  # a shard's last batch: its consecutive layers reuse it


def _rebuilt(model: Any, item: SweepItem) -> tuple[BetaPass, SweepActivations]:
    batch = item.batch
    key = (model.fingerprint, item.dtype, item.options, tuple(batch.ids.flatten().tolist()),
           tuple(batch.mean_source_ids.flatten().tolist()))
    if key not in _REBUILT:
        _REBUILT.clear()
        passer = BetaPass(Engine(model, item.dtype, item.options), batch.ids)
        _REBUILT[key] = passer, engine_sweep_activations(passer.engine, passer, batch)
    return _REBUILT[key]


@torch.no_grad()
def sweep_layer(model: Any, item: SweepItem) -> SweepPart:
    """Every head of `item.layer` as a source on `item.batch`: β of the logit difference per head `[H]`
    and the prompt-mean relevance to each later layer's z and q/k/v (k, v expanded to query heads)."""
    passer, activations = (item.passer, item.activations) if item.passer is not None and item.activations is not None \
        else _rebuilt(model, item)
    H, KV = passer.w.n_heads, passer.w.n_kv_heads
    hooks = _SweepHooks(item.layer, activations, H)
    beta = passer.run(item.layer, hooks)
    out = passer.logit_diff_beta(beta, item.batch.good, item.batch.bad).mean(1).double()  # type: ignore[arg-type]
    to_z = {target: values.mean(1).double() for target, values in hooks.to_z.items()}
    to_input: dict[str, dict[int, Tensor]] = {c: {} for c in COMPONENTS}
    for c in COMPONENTS:
        for target, values in hooks.to_input[c].items():
            values = values.mean(1).double()
            to_input[c][target] = values.repeat_interleave(H // KV, dim=-1) if c != "q" and KV != H else values
    return out, to_z, to_input


@torch.no_grad()
def fast_sweep(engine: Engine, batches: Sequence[LogitDiffBatch], source_layers: Sequence[int] | None = None,
               progress: Callable[[float, str], None] | None = None) -> Sweep:
    """Same result as `circuits.sweep` (every head as a source, relevance to every later head's
    q/k/v/z and to the logit difference), with β-only passes over cached clean totals. The source
    layers of a batch go through `probe.parallel.map_items` (a loop here; Ray actors for a sharded
    scan) and are summed in the serial order: a sharded sweep equals the serial one bit for bit."""
    model = engine.model
    L, H = engine.w.n_layers, engine.w.n_heads
    layers = list(range(L)) if source_layers is None else list(source_layers)
    to_output = torch.zeros(L, H, dtype=torch.float64)
    to_z = torch.zeros(L, H, L, H, dtype=torch.float64)
    to_input = {c: torch.zeros(L, H, L, H, dtype=torch.float64) for c in COMPONENTS}
    total_prompts = sum(b.n_prompts for b in batches)
    clean, done, steps = 0.0, 0, len(batches) * len(layers)
    dtype = next(name for name, value in DTYPES.items() if value == engine.dtype)
    z_means = []
    for batch in batches:
        passer = BetaPass(engine, batch.ids)
        activations = engine_sweep_activations(engine, passer, batch)
        z_means.append({Head(l, h): activations.z_mean[l][:, h] for l in range(L) for h in range(H)})
        weight = batch.n_prompts / total_prompts
        rows = torch.arange(batch.n_prompts)
        logits = model.logits(batch.ids, positions="last")[:, -1]
        clean += float((logits[rows, batch.good] - logits[rows, batch.bad]).sum()) / total_prompts
        items = [SweepItem(dtype, engine.options, batch, layer, passer, activations) for layer in layers]

        def step(finished: int, _: int, base: int = done, name: str = batch.name) -> None:
            if progress and finished:
                progress((base + finished) / steps, f"CD-T sweep {name}: source layer {layers[finished - 1]}")

        for layer, (out, z_part, input_part) in zip(layers, map_items(model, sweep_layer, items, step)):
            to_output[layer] += weight * out
            for target, values in z_part.items():
                to_z[layer, :, target] += weight * values
            for c in COMPONENTS:
                for target, values in input_part[c].items():
                    to_input[c][layer, :, target] += weight * values
        done += len(layers)
    return Sweep(to_output, to_z, to_input, clean, total_prompts, z_means)
