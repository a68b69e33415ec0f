"""CD-T oracles on tiny models: β itself, not only β + γ.

Fast β == engine β on tiny models (β itself, at every later head and the logits), and a plain
loop-based re-implementation of the rules, written from docs/cdt.md against the Hugging Face modules
(not `rules.py` or `arch.py`), == the engine's β for one source head on tiny GPT-2 and tiny Llama/GQA.
The hand-computed case of each rule: tests/analyses/cdt/test_cdt_rule_oracles.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from analyses.cdt import fast
from analyses.cdt.engine import Engine, RuleOptions
from cdt_oracle_helpers import F64, SOURCE_HEAD, SOURCE_LAYER, _engine_beta, _FastSource, _relative


# ---- tiny models: fast β == engine β, and an independent loop-based implementation ----------------

PROMPT = "the capital of mary is the book of john and the key"


def _with_random_affine(model, seed: int = 0):
    """Randomise norm weights and every bias (GPT-2 initialises biases to 0, so no bias rule would fire)."""
    gen = torch.Generator().manual_seed(seed)
    hf = model.hf_model

    def fill(param, base: float, scale: float) -> None:
        param.copy_(base + scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))

    with torch.no_grad():
        if model.hf_model.config.model_type == "gpt2":
            body = hf.transformer
            for block in body.h:
                for ln in (block.ln_1, block.ln_2):
                    fill(ln.weight, 1.0, 0.3)
                    fill(ln.bias, 0.0, 0.3)
                for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                    fill(lin.bias, 0.0, 0.1)
            fill(body.ln_f.weight, 1.0, 0.3)
            fill(body.ln_f.bias, 0.0, 0.3)
        else:
            body = hf.model
            for block in body.layers:
                fill(block.input_layernorm.weight, 1.0, 0.3)
                fill(block.post_attention_layernorm.weight, 1.0, 0.3)
            fill(body.norm.weight, 1.0, 0.3)
    return model


def _mu(model, length: int, seed: int = 1) -> torch.Tensor:
    """A fixed reference mean for the source head's z `[T, d_head]` (β_s = z − μ, γ_s = μ)."""
    gen = torch.Generator().manual_seed(seed)
    d_head = model.hf_model.config.hidden_size // model.hf_model.config.num_attention_heads
    return 0.2 * torch.randn(length, d_head, generator=gen, dtype=F64)


@pytest.mark.parametrize("fixture,options", [
    ("tiny_gpt2", RuleOptions()), ("tiny_gpt2", RuleOptions(ln_bias="normalised")),
    ("tiny_llama", RuleOptions()), ("tiny_gqa", RuleOptions(product="symmetric")),
    ("tiny_gqa", RuleOptions(product="irrelevant_first")),
    ("tiny_gqa", RuleOptions(attention="value_only", stabilise=False)),
])
def test_fast_beta_equals_engine_beta_itself(fixture, options, request):
    """β itself (not a projection of it, not β + γ) of every later head's q, k, v and z, the final
    residual at the read-out position and the logit difference: the fast pass == the two-stream engine."""
    model = _with_random_affine(request.getfixturevalue(fixture))
    engine = Engine(model, "float64", options)
    ids = model.encode(PROMPT)
    mu = _mu(model, ids.shape[1])
    hooks, beta_logits, record = _engine_beta(engine, ids, mu)
    passer = fast.BetaPass(engine, ids)
    quick = _FastSource(mu)
    final = passer.run(SOURCE_LAYER, quick)
    later = [layer for layer in range(engine.w.n_layers) if layer > SOURCE_LAYER]
    assert later and hooks.z[later[-1]].abs().max() > 1e-3  # the source reaches the last layer's heads
    for layer in later:
        assert _relative(quick.z[layer], hooks.z[layer][0]) < 1e-9, f"z of layer {layer}"
        for name, a, b in zip("qkv", quick.qkv[layer], hooks.qkv[layer]):
            assert _relative(a, b[0]) < 1e-9, f"{name} of layer {layer}"
    resid = record[f"blocks.{engine.w.n_layers - 1}.hook_resid_post"][0][0, -1]
    assert _relative(final[0, 0, -1], resid) < 1e-9
    good, bad = torch.tensor([5]), torch.tensor([7])
    diff = beta_logits[-1, 5] - beta_logits[-1, 7]
    assert abs(float(passer.logit_diff_beta(final, good, bad)[0, 0] - diff)) < 1e-9 * float(beta_logits.abs().max())


# The plain implementation: docs/cdt.md's rules, written again per position and per head from the
# Hugging Face modules' weights (nothing from rules.py, engine.py, fast.py or arch.py).

def _plain_bias(yb, yg, b):
    if b is None:
        return yb, yg
    share = b * yb.abs() / (yb.abs() + yg.abs() + 1e-8)
    return yb + share, yg + (b - share)


def _plain_linear(pair, W, b=None):  # x W + b, W [d_in, d_out]
    return _plain_bias(pair[0] @ W, pair[1] @ W, b)


def _plain_stabilise(pair):
    beta, gamma = pair
    out_b, out_g = beta.clone(), gamma.clone()
    for i in range(beta.shape[0]):
        if beta[i] * gamma[i] < 0:
            if abs(beta[i]) >= abs(gamma[i]):
                out_b[i], out_g[i] = beta[i] + gamma[i], 0.0
            else:
                out_b[i], out_g[i] = 0.0, beta[i] + gamma[i]
    return out_b, out_g


def _plain_act(pair, f):
    return f(pair[0] + pair[1]) - f(pair[1]), f(pair[1])


def _plain_layer_norm(pair, ln):
    beta, gamma = pair
    total = beta + gamma
    sigma = torch.sqrt(((total - total.mean()) ** 2).mean() + ln.eps)
    w, b = ln.weight.double(), ln.bias.double()
    share = b * beta.abs() / (beta.abs() + gamma.abs() + 1e-8)  # the reference: input parts
    return (beta - beta.mean()) / sigma * w + share, (gamma - gamma.mean()) / sigma * w + (b - share)


def _plain_rms(pair, module):
    beta, gamma = pair
    scale = module.weight.double() / torch.sqrt(((beta + gamma) ** 2).mean() + module.variance_epsilon)
    return beta * scale, gamma * scale


def _plain_attention(q, k, v, scale, source, mu):
    """q/k/v: per position, per head (lists of [d_head] pairs). Paper rule, causal; returns z pairs."""
    T, H = len(q), len(q[0])
    z = [[None] * H for _ in range(T)]
    for h in range(H):
        for i in range(T):
            bs = torch.stack([q[i][h][0] @ k[j][h][0] * scale for j in range(i + 1)])
            ts = torch.stack([(q[i][h][0] + q[i][h][1]) @ (k[j][h][0] + k[j][h][1]) * scale for j in range(i + 1)])
            bp, tp = torch.softmax(bs, 0), torch.softmax(ts, 0)
            zb = sum(bp[j] * v[j][h][0] for j in range(i + 1))
            zt = sum(tp[j] * (v[j][h][0] + v[j][h][1]) for j in range(i + 1))
            z[i][h] = (zt - mu[i], mu[i]) if source(h) else (zb, zt - zb)
    return z


def _plain_gpt2(model, ids, mu):
    hf = model.hf_model
    H, d = hf.config.n_head, hf.config.n_embd
    dh, T = d // H, ids.shape[1]
    body = hf.transformer
    resid = [(torch.zeros(d, dtype=F64), body.wte.weight[ids[0, i]].double() + body.wpe.weight[i].double())
             for i in range(T)]
    zs = {}
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    for layer, block in enumerate(body.h):
        W, b = block.attn.c_attn.weight.double(), block.attn.c_attn.bias.double()
        qkv = [_plain_linear(_plain_layer_norm(r, block.ln_1), W, b) for r in resid]

        def heads(part: int):
            return [[(qb[part * d + h * dh: part * d + (h + 1) * dh], qg[part * d + h * dh: part * d + (h + 1) * dh])
                     for h in range(H)] for qb, qg in qkv]

        z = _plain_attention(heads(0), heads(1), heads(2), dh ** -0.5,
                             lambda h: layer == SOURCE_LAYER and h == SOURCE_HEAD, mu)
        zs[layer] = torch.stack([torch.stack([z[i][h][0] for h in range(H)]) for i in range(T)])
        W_O, b_O = block.attn.c_proj.weight.double(), block.attn.c_proj.bias.double()
        for i in range(T):
            zb, zg = torch.cat([z[i][h][0] for h in range(H)]), torch.cat([z[i][h][1] for h in range(H)])
            ab, ag = _plain_linear((zb, zg), W_O, b_O)
            mid = (resid[i][0] + ab, resid[i][1] + ag)
            up = _plain_stabilise(_plain_linear(_plain_layer_norm(mid, block.ln_2), block.mlp.c_fc.weight.double(),
                                                block.mlp.c_fc.bias.double()))
            down = _plain_stabilise(_plain_linear(_plain_act(up, gelu), block.mlp.c_proj.weight.double(),
                                                  block.mlp.c_proj.bias.double()))
            resid[i] = _plain_stabilise((mid[0] + down[0], mid[1] + down[1]))
    final = _plain_layer_norm(resid[-1], body.ln_f)
    return zs, _plain_linear(final, hf.lm_head.weight.double().T)[0]


def _plain_llama(model, ids, mu):
    hf = model.hf_model
    cfg = hf.config
    H, KV, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    dh, T = d // H, ids.shape[1]
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=F64) / dh)

    def rope(x, pos):  # Hugging Face convention: rotate the two halves
        angle = torch.cat([pos * inv_freq, pos * inv_freq])
        return x * torch.cos(angle) + torch.cat([-x[dh // 2:], x[:dh // 2]]) * torch.sin(angle)

    body = hf.model
    resid = [(torch.zeros(d, dtype=F64), body.embed_tokens.weight[ids[0, i]].double()) for i in range(T)]
    zs = {}
    silu = lambda x: x * torch.sigmoid(x)  # noqa: E731
    for layer, block in enumerate(body.layers):
        att = block.self_attn
        x = [_plain_rms(r, block.input_layernorm) for r in resid]
        q, k, v = [], [], []
        for i in range(T):
            pq = _plain_linear(x[i], att.q_proj.weight.double().T)
            pk = _plain_linear(x[i], att.k_proj.weight.double().T)
            pv = _plain_linear(x[i], att.v_proj.weight.double().T)
            kv_of = [h // (H // KV) for h in range(H)]  # query head h reads KV head h // group
            q.append([(rope(pq[0][h * dh:(h + 1) * dh], i), rope(pq[1][h * dh:(h + 1) * dh], i)) for h in range(H)])
            k.append([(rope(pk[0][g * dh:(g + 1) * dh], i), rope(pk[1][g * dh:(g + 1) * dh], i)) for g in kv_of])
            v.append([(pv[0][g * dh:(g + 1) * dh], pv[1][g * dh:(g + 1) * dh]) for g in kv_of])
        z = _plain_attention(q, k, v, dh ** -0.5, lambda h: layer == SOURCE_LAYER and h == SOURCE_HEAD, mu)
        zs[layer] = torch.stack([torch.stack([z[i][h][0] for h in range(H)]) for i in range(T)])
        mlp = block.mlp
        for i in range(T):
            zb, zg = torch.cat([z[i][h][0] for h in range(H)]), torch.cat([z[i][h][1] for h in range(H)])
            ab, ag = _plain_linear((zb, zg), att.o_proj.weight.double().T)
            mid = (resid[i][0] + ab, resid[i][1] + ag)
            x2 = _plain_rms(mid, block.post_attention_layernorm)
            gate = _plain_stabilise(_plain_linear(x2, mlp.gate_proj.weight.double().T))
            up = _plain_stabilise(_plain_linear(x2, mlp.up_proj.weight.double().T))
            a = _plain_act(gate, silu)
            hidden_b = a[0] * up[0]  # relevant_only: β = β_act β_up, γ = the rest of the product
            hidden = (hidden_b, (a[0] + a[1]) * (up[0] + up[1]) - hidden_b)
            down = _plain_stabilise(_plain_linear(hidden, mlp.down_proj.weight.double().T))
            resid[i] = _plain_stabilise((mid[0] + down[0], mid[1] + down[1]))
    final = _plain_rms(resid[-1], body.norm)
    return zs, _plain_linear(final, hf.lm_head.weight.double().T)[0]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gqa"])
def test_engine_beta_equals_a_plain_loop_implementation(fixture, request):
    """β of every head's z and of the last position's logits, one source head (L0H1, β = z − μ),
    default rules: the engine == the plain per-position, per-head re-implementation."""
    model = _with_random_affine(request.getfixturevalue(fixture))
    ids = model.encode(PROMPT)
    mu = _mu(model, ids.shape[1])
    plain = _plain_gpt2 if model.hf_model.config.model_type == "gpt2" else _plain_llama
    with torch.no_grad():
        zs, logits = plain(model, ids, mu)
    hooks, beta_logits, _ = _engine_beta(Engine(model, "float64"), ids, mu)
    assert logits.abs().max() > 1e-3 and zs[1].abs().max() > 1e-3
    for layer, z in zs.items():
        assert _relative(hooks.z[layer][0], z) < 1e-8, f"z of layer {layer}"
    assert _relative(beta_logits[-1], logits) < 1e-8


def test_layer_norm_bias_split_never_touches_rms_models(tiny_gqa):
    """RMSNorm has no bias: Llama-family β (SmolLM2's family) is identical under both LN bias splits."""
    model = _with_random_affine(tiny_gqa)
    ids = model.encode(PROMPT)
    mu = _mu(model, ids.shape[1])
    a = _engine_beta(Engine(model, "float64", RuleOptions(ln_bias="input")), ids, mu)[1]
    b = _engine_beta(Engine(model, "float64", RuleOptions(ln_bias="normalised")), ids, mu)[1]
    assert a.abs().max() > 1e-3 and torch.equal(a, b)
