"""CD-T propagation rules: each maps a split input (β, γ) to a split output with β' + γ' = f(β + γ).

Every rule here keeps the invariant exactly (up to float rounding): where a rule's natural split
would lose a term (a bias when both linear parts are 0, a product's cross terms), the remainder goes
to γ, so `β' + γ'` is always the operation applied to the total. See docs/cdt.md for the formulas
and the reasons; the names follow the paper (Hsu et al., arXiv 2407.00886v3, §3.2 and App. B.1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from analyses.cdt.arch import Norm

Pair = tuple[torch.Tensor, torch.Tensor]
TOL = 1e-8  # the paper's tolerance in the bias-share denominator


def split_bias(y_beta: torch.Tensor, y_gamma: torch.Tensor, bias: torch.Tensor | None) -> Pair:
    """Add `bias` to the two parts in proportion to their magnitudes (Singh et al. 2019 / paper §3.2).

    β gets b·|yβ| / (|yβ| + |yγ| + tol); γ gets the rest of b, so the sum is exact and a unit where
    both parts are 0 gives its whole bias to γ (spec pitfall 13).
    """
    if bias is None:
        return y_beta, y_gamma
    share = bias * y_beta.abs() / (y_beta.abs() + y_gamma.abs() + TOL)
    return y_beta + share, y_gamma + (bias - share)


def linear(pair: Pair, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Pair:
    """y = x W + b on both parts (W is `[d_in, d_out]`), bias split by `split_bias`."""
    beta, gamma = pair
    return split_bias(beta @ weight, gamma @ weight, bias)


def linear_heads(pair: Pair, weight: torch.Tensor, bias: torch.Tensor | None) -> Pair:
    """Per-head projection: x `[B, T, d_model]`, W `[H, d_model, d_head]` → `[B, T, H, d_head]`."""
    beta, gamma = pair
    y_beta = torch.einsum("btm,hmd->bthd", beta, weight)
    y_gamma = torch.einsum("btm,hmd->bthd", gamma, weight)
    return split_bias(y_beta, y_gamma, bias)


# LayerNorm bias split: by |β|, |γ| of the norm's input (the authors' code) or of its normalised output
LN_BIAS_SPLITS = ("input", "normalised")


def norm(pair: Pair, spec: Norm, ln_bias: str = "input") -> Pair:
    """LayerNorm / RMSNorm with the scale taken from the *total* (shared denominator).

    RMSNorm: β' = β·w / rms(β+γ), γ' = γ·w / rms(β+γ): exact, no bias. LayerNorm: centring is
    linear (each part centred on its own mean), the shared 1/σ(β+γ) scales both, and the bias b is
    split per unit by magnitudes: `ln_bias="input"` (default, the authors' code,
    `prop_layer_norm`): β gets b·|β|/(|β|+|γ|+tol) of the *input* parts; `"normalised"`: by the
    normalised parts. Either way γ takes the rest of b, so β' + γ' is exact.
    """
    if ln_bias not in LN_BIAS_SPLITS:
        raise ValueError(f"unknown LayerNorm bias split {ln_bias!r}; choose one of {LN_BIAS_SPLITS}")
    beta, gamma = pair
    total = beta + gamma
    if spec.kind == "rms":
        inv = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + spec.eps)
        return beta * inv * spec.weight, gamma * inv * spec.weight
    inv = torch.rsqrt(total.var(-1, keepdim=True, unbiased=False) + spec.eps)
    beta_n = (beta - beta.mean(-1, keepdim=True)) * inv * spec.weight
    gamma_n = (gamma - gamma.mean(-1, keepdim=True)) * inv * spec.weight
    if spec.bias is None or ln_bias == "normalised":
        return split_bias(beta_n, gamma_n, spec.bias)
    share = spec.bias * beta.abs() / (beta.abs() + gamma.abs() + TOL)
    return beta_n + share, gamma_n + (spec.bias - share)


def activation(pair: Pair, act: Callable[[torch.Tensor], torch.Tensor]) -> Pair:
    """Elementwise non-linearity, irrelevant part first: γ' = act(γ), β' = act(β+γ) − act(γ)."""
    beta, gamma = pair
    gamma_out = act(gamma)
    return act(beta + gamma) - gamma_out, gamma_out


def product(a: Pair, b: Pair, mode: str = "relevant_only") -> Pair:
    """Elementwise product of two decomposed factors (gated MLPs: act(gate) ⊙ up).

    - `relevant_only` (default, mirrors the attention rule β_z = β_probs β_v): β = βa βb, γ = the rest.
    - `symmetric`: β = βa βb + ½(βa γb + γa βb), γ = γa γb + ½(βa γb + γa βb).
    - `irrelevant_first` (mirrors the activation rule): γ = γa γb, β = the rest.
    """
    total = (a[0] + a[1]) * (b[0] + b[1])
    if mode == "relevant_only":
        beta = a[0] * b[0]
    elif mode == "symmetric":
        beta = a[0] * b[0] + 0.5 * (a[0] * b[1] + a[1] * b[0])
    elif mode == "irrelevant_first":
        beta = total - a[1] * b[1]
    else:
        raise ValueError(f"unknown product rule {mode!r}")
    return beta, total - beta


def stabilise(pair: Pair) -> Pair:
    """Where β and γ have opposite signs, give the sum to the larger part (paper App. B.1); sum kept."""
    beta, gamma = pair
    opposite = (beta * gamma) < 0
    total = beta + gamma
    beta_wins = beta.abs() >= gamma.abs()
    new_beta = torch.where(opposite, torch.where(beta_wins, total, torch.zeros_like(total)), beta)
    new_gamma = torch.where(opposite, torch.where(beta_wins, torch.zeros_like(total), total), gamma)
    return new_beta, new_gamma


def rotate(pair: Pair, cos: torch.Tensor, sin: torch.Tensor) -> Pair:
    """Rotary embedding on `[B, T, H, d_head]` parts (a fixed linear map per position, no bias).

    cos/sin `[T, r]` follow the Hugging Face convention (rotate the two halves of the first r dims);
    with partial rotary (r < d_head, GPT-NeoX) the other d_head − r dims pass unchanged.
    """
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    dims = cos.shape[-1]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :dims], x[..., dims:]
        half = dims // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        out = x_rot * cos + rotated * sin
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)

    return rot(pair[0]), rot(pair[1])


def norm_heads(pair: Pair, spec: Norm, whole: bool, ln_bias: str = "input") -> Pair:
    """A q/k norm on `[B, T, heads, d_head]` parts: per head (Gemma 3, Qwen3: over d_head) or over the
    whole projection (OLMo-2: over all heads' dims at once); the norm rule either way."""
    if not whole:
        return norm(pair, spec, ln_bias)
    shape = pair[0].shape
    flat = norm((pair[0].flatten(-2), pair[1].flatten(-2)), spec, ln_bias)
    return flat[0].reshape(shape), flat[1].reshape(shape)


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-cap c·tanh(s / c) (identity without a cap)."""
    return scores if not cap else torch.tanh(scores / cap) * cap


def attention_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """`[T, T]` bool: key j is visible to query i iff j ≤ i (and i − window < j with a sliding window)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (j > i - window)
    return visible


def attention(q: Pair, k: Pair, v: Pair, scale: float, visible: torch.Tensor,
              rule: str = "paper", cap: float | None = None) -> tuple[Pair, torch.Tensor]:
    """Self-attention on decomposed q, k, v `[B, T, H, d_head]` (k, v already expanded to query heads).

    `paper` (§3.2): β_scores = βq βkᵀ·s, β_probs = softmax(β_scores), β_z = β_probs βv and
    γ_z = P (βv + γv) − β_z with P the true pattern. `value_only`: the pattern is held at P,
    β_z = P βv (a source then acts only through values). With a logit soft-cap `cap` (Gemma 2) the
    scores pass c·tanh(s/c) before the mask in both softmaxes, as in the model. Returns ((β_z, γ_z), P).
    """
    neg = torch.finfo(q[0].dtype).min
    q_total, k_total, v_total = q[0] + q[1], k[0] + k[1], v[0] + v[1]
    scores = softcap(torch.einsum("bqhd,bkhd->bhqk", q_total, k_total) * scale, cap)
    pattern = torch.softmax(scores.masked_fill(~visible, neg), dim=-1)
    z_total = torch.einsum("bhqk,bkhd->bqhd", pattern, v_total)
    if rule == "paper":
        beta_scores = softcap(torch.einsum("bqhd,bkhd->bhqk", q[0], k[0]) * scale, cap)
        beta_pattern = torch.softmax(beta_scores.masked_fill(~visible, neg), dim=-1)
        z_beta = torch.einsum("bhqk,bkhd->bqhd", beta_pattern, v[0])
    elif rule == "value_only":
        z_beta = torch.einsum("bhqk,bkhd->bqhd", pattern, v[0])
    else:
        raise ValueError(f"unknown attention rule {rule!r}")
    return (z_beta, z_total - z_beta), pattern
