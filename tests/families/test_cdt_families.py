"""CD-T on every family of tests/support/families.py, loaded the user's way (`hf:<folder>`).

Per family (3 layers, d_model 64, random weights and norm weights/biases):

- β + γ == the model's own activations: the bridge's hook cache at every layer's resid pre/mid/post
  and the logits (fp32, relative to the largest value, ≤ 1e-4), with some words as the source;
- the fast β-only pass == the two-stream engine, β itself (q/k/v/z of every later head, the final
  residual at the read-out position, the logit difference; float64, ≤ 1e-9 relative), source L0H1;
- a plain per-position, per-head loop written from docs/cdt.md against the *independent* Hugging Face
  copy's modules (nothing from analyses/cdt or probe/architecture) == the engine's β of every head's z
  and of the logits, for one family per rule the families add: q/k/v biases (qwen2), QK-norm per
  head (qwen3), QK-norm over the whole projection and post-norm-only blocks (olmo2), attention and
  final logit soft-caps with sliding windows and Gemma's 1 + w (gemma2), parallel blocks, partial
  rotary and packed qkv (gpt_neox), packed qkv and gate/up (phi3), MoE routed by the total (mixtral,
  qwen3_moe).

Deviations go to the proof matrix (tests/support/matrix.py): `cdt_exact`, `cdt_fast_vs_engine`, `cdt_plain_beta`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import matrix
from analyses.cdt import fast
from analyses.cdt.engine import Engine
from cdt_oracle_helpers import SOURCE_HEAD, SOURCE_LAYER, _engine_beta, _FastSource, _relative
from families import FAMILIES

F64 = torch.float64
PROMPTS = ("the capital of mary is the book", "a key to the park is a secret")
RESIDUALS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cdt_families")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\n" + matrix.format_cells(list(FAMILIES)))


def _mu(model, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(length, model.d_head, generator=gen, dtype=F64)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_beta_plus_gamma_equals_the_models_activations(name, root):
    model, _, _ = matrix.loaded_family(name, root)
    engine = Engine(model, "float32")
    worst, compared = 0.0, 0
    for text in PROMPTS:
        ids = model.encode(text)
        logits, cache = model.bridge.run_with_cache(ids)
        relevant = torch.zeros(ids.shape, dtype=torch.bool)
        relevant[0, 1:3] = True
        (beta_logits, gamma_logits), record = engine.decompose(ids, relevant_positions=relevant, record=True)
        assert beta_logits.abs().max() > 1e-3  # the source reaches the output
        for hook, (beta, gamma) in record.items():
            if hook.endswith(RESIDUALS) and hook in cache:
                reference = cache[hook].double()
                worst = max(worst, _relative((beta + gamma).double(), reference))
                compared += 1
        worst = max(worst, _relative((beta_logits + gamma_logits).double(), logits.double()))
    assert compared >= 2 * len(PROMPTS) * model.n_layers
    assert matrix.record(name, "cdt_exact", worst) <= 1e-4, f"{name}: β + γ off by {worst:.2e}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fast_beta_equals_the_engine(name, root):
    model, _, _ = matrix.loaded_family(name, root)
    engine = Engine(model, "float64")
    ids = model.encode(PROMPTS[0])
    mu = _mu(model, ids.shape[1])
    hooks, beta_logits, record = _engine_beta(engine, ids, mu)
    passer = fast.BetaPass(engine, ids)
    quick = _FastSource(mu)
    final = passer.run(SOURCE_LAYER, quick)
    later = range(SOURCE_LAYER + 1, engine.w.n_layers)
    assert hooks.z[later[-1]].abs().max() > 1e-3
    worst = 0.0
    for layer in later:
        worst = max(worst, _relative(quick.z[layer], hooks.z[layer][0]))
        for a, b in zip(quick.qkv[layer], hooks.qkv[layer]):
            worst = max(worst, _relative(a, b[0]))
    resid = record[f"blocks.{engine.w.n_layers - 1}.hook_resid_post"][0][0, -1]
    worst = max(worst, _relative(final[0, 0, -1], resid))
    good, bad = torch.tensor([5]), torch.tensor([7])
    diff = beta_logits[-1, 5] - beta_logits[-1, 7]
    worst = max(worst, abs(float(passer.logit_diff_beta(final, good, bad)[0, 0] - diff))
                / float(beta_logits.abs().max()))
    # MoE: both passes route with the model's float32 router on their own float64 totals (equal up to
    # float64 rounding), so a last-bit flip of a float32 routing weight is the floor there
    bound = 1e-6 if model.hf_model.config.model_type.endswith("moe") or name == "mixtral" else 1e-9
    assert matrix.record(name, "cdt_fast_vs_engine", worst, tolerance=bound) <= bound


# ---- the plain implementation: docs/cdt.md's rules, per position and per head, from the HF copy ------

def _bias(yb, yg, b):
    if b is None:
        return yb, yg
    share = b * yb.abs() / (yb.abs() + yg.abs() + 1e-8)
    return yb + share, yg + (b - share)


def _lin(pair, linear, rows: slice | None = None):
    """x W^T + b of an nn.Linear (optionally only its output rows `rows`), bias split by magnitudes."""
    W = linear.weight.double()
    b = None if linear.bias is None else linear.bias.double()
    if rows is not None:
        W, b = W[rows], None if b is None else b[rows]
    return _bias(pair[0] @ W.T, pair[1] @ W.T, b)


def _stab(pair):
    beta, gamma = pair
    out_b, out_g = beta.clone(), gamma.clone()
    for i in range(beta.shape[0]):
        if beta[i] * gamma[i] < 0:
            total = beta[i] + gamma[i]
            out_b[i], out_g[i] = (total, 0.0) if abs(beta[i]) >= abs(gamma[i]) else (0.0, total)
    return out_b, out_g


def _act(pair, f):
    return f(pair[0] + pair[1]) - f(pair[1]), f(pair[1])


def _rms(pair, module, offset: float = 0.0):
    beta, gamma = pair
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    scale = (module.weight.double() + offset) / torch.sqrt(((beta + gamma) ** 2).mean() + eps)
    return beta * scale, gamma * scale


def _ln(pair, module):
    beta, gamma = pair
    total = beta + gamma
    sigma = torch.sqrt(((total - total.mean()) ** 2).mean() + module.eps)
    w, b = module.weight.double(), module.bias.double()
    share = b * beta.abs() / (beta.abs() + gamma.abs() + 1e-8)
    return (beta - beta.mean()) / sigma * w + share, (gamma - gamma.mean()) / sigma * w + (b - share)


def _softcap(x, cap):
    return x if not cap else torch.tanh(x / cap) * cap


def _plain_attention(q, k, v, scale, window, cap, is_source, mu):
    """Paper rule; q/k/v [T][H] pairs of [d_head] (k/v already per query head); returns z pairs [T][H]."""
    T, H = len(q), len(q[0])
    z = [[None] * H for _ in range(T)]
    for h in range(H):
        for i in range(T):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            bs = torch.stack([_softcap(q[i][h][0] @ k[j][h][0] * scale, cap) for j in keys])
            ts = torch.stack([_softcap((q[i][h][0] + q[i][h][1]) @ (k[j][h][0] + k[j][h][1]) * scale, cap)
                              for j in keys])
            bp, tp = torch.softmax(bs, 0), torch.softmax(ts, 0)
            zb = sum(bp[n] * v[j][h][0] for n, j in enumerate(keys))
            zt = sum(tp[n] * (v[j][h][0] + v[j][h][1]) for n, j in enumerate(keys))
            z[i][h] = (zt - mu[i], mu[i]) if is_source(h) else (zb, zt - zb)
    return z


def _rope(x, pos, r, theta):
    """Hugging Face rotary on the first r dims (rotate their two halves); the rest pass."""
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=F64) / r)
    angle = torch.cat([pos * inv, pos * inv])
    rot = x[:r] * torch.cos(angle) + torch.cat([-x[r // 2:r], x[:r // 2]]) * torch.sin(angle)
    return torch.cat([rot, x[r:]])


def _gated(pair, gate, up, down, f):
    """gate/up pairs come from the caller; relevant_only product, stabilised like the engine."""
    a = _act(_stab(gate), f)
    u = _stab(up)
    hb = a[0] * u[0]
    return _stab(down((hb, (a[0] + a[1]) * (u[0] + u[1]) - hb)))


def _plain(copy, family: str, ids, mu):
    cfg = copy.config
    neox = family == "gpt_neox"
    gemma = family == "gemma2"
    body = copy.gpt_neox if neox else copy.model
    d, H = cfg.hidden_size, cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    dh = getattr(cfg, "head_dim", None) or d // H
    T = ids.shape[1]
    rope = cfg.rope_parameters
    theta = rope["rope_theta"]
    r = int(dh * rope.get("partial_rotary_factor", 1.0))
    scale = cfg.query_pre_attn_scalar ** -0.5 if gemma else dh ** -0.5
    offset = 1.0 if gemma else 0.0
    embed = (body.embed_in if neox else body.embed_tokens).weight.double() * (math.sqrt(d) if gemma else 1.0)
    resid = [(torch.zeros(d, dtype=F64), embed[ids[0, i]]) for i in range(T)]
    silu = torch.nn.functional.silu
    act = {"silu": silu, "gelu": torch.nn.functional.gelu,
           "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[
        getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
    zs = {}
    for layer, block in enumerate(body.layers):
        att = block.attention if neox else block.self_attn
        window = cfg.sliding_window if gemma and cfg.layer_types[layer] == "sliding_attention" else None
        if neox:
            x = [_ln(p, block.input_layernorm) for p in resid]
        elif family == "olmo2":
            x = resid  # no pre-norm
        else:
            x = [_rms(p, block.input_layernorm, offset) for p in resid]
        q, k, v = [], [], []
        for i in range(T):
            if neox:  # packed per head: [q_h | k_h | v_h] blocks of d_head rows
                parts = [[_lin(x[i], att.query_key_value, slice(h * 3 * dh + c * dh, h * 3 * dh + (c + 1) * dh))
                          for h in range(H)] for c in range(3)]
                qh, kh, vh = parts
            else:
                if family == "phi3":  # packed [q (H·dh) | k (KV·dh) | v (KV·dh)]
                    pq = _lin(x[i], att.qkv_proj, slice(0, H * dh))
                    pk = _lin(x[i], att.qkv_proj, slice(H * dh, (H + KV) * dh))
                    pv = _lin(x[i], att.qkv_proj, slice((H + KV) * dh, (H + 2 * KV) * dh))
                else:
                    pq, pk, pv = _lin(x[i], att.q_proj), _lin(x[i], att.k_proj), _lin(x[i], att.v_proj)
                if family == "olmo2":  # RMS over the whole projection
                    pq, pk = _rms(pq, att.q_norm), _rms(pk, att.k_norm)
                qh = [(pq[0][h * dh:(h + 1) * dh], pq[1][h * dh:(h + 1) * dh]) for h in range(H)]
                kh = [(pk[0][g * dh:(g + 1) * dh], pk[1][g * dh:(g + 1) * dh]) for g in range(KV)]
                vh = [(pv[0][g * dh:(g + 1) * dh], pv[1][g * dh:(g + 1) * dh]) for g in range(KV)]
                if hasattr(att, "q_norm") and family != "olmo2":  # per head (Qwen3)
                    qh = [_rms(p, att.q_norm) for p in qh]
                    kh = [_rms(p, att.k_norm) for p in kh]
            group = H // KV
            q.append([(_rope(b, i, r, theta), _rope(g, i, r, theta)) for b, g in qh])
            k.append([(_rope(kh[h // group][0], i, r, theta), _rope(kh[h // group][1], i, r, theta)) for h in range(H)])
            v.append([vh[h // group] for h in range(H)])
        z = _plain_attention(q, k, v, scale, window, getattr(cfg, "attn_logit_softcapping", None),
                             lambda h: layer == SOURCE_LAYER and h == SOURCE_HEAD, mu)
        zs[layer] = torch.stack([torch.stack([z[i][h][0] for h in range(H)]) for i in range(T)])
        out_proj = att.dense if neox else att.o_proj
        for i in range(T):
            zb, zg = torch.cat([z[i][h][0] for h in range(H)]), torch.cat([z[i][h][1] for h in range(H)])
            attn = _lin((zb, zg), out_proj)
            if family in ("olmo2", "gemma2"):
                attn = _rms(attn, block.post_attention_layernorm, offset)
            mid = (resid[i][0] + attn[0], resid[i][1] + attn[1])
            if neox:  # parallel: the MLP reads the block input
                h_in = _ln(resid[i], block.post_attention_layernorm)
                up = _stab(_lin(h_in, block.mlp.dense_h_to_4h))
                out = _stab(_lin(_act(up, act), block.mlp.dense_4h_to_h))
            else:
                if family == "olmo2":
                    h_in = mid
                elif gemma:
                    h_in = _rms(mid, block.pre_feedforward_layernorm, offset)
                else:
                    h_in = _rms(mid, block.post_attention_layernorm)
                mlp = block.mlp
                if family in ("mixtral", "qwen3_moe"):
                    out = _plain_moe(h_in, mlp, act, cfg)
                elif family == "phi3":
                    f = cfg.intermediate_size
                    out = _gated(h_in, _lin(h_in, mlp.gate_up_proj, slice(0, f)),
                                 _lin(h_in, mlp.gate_up_proj, slice(f, 2 * f)), lambda p: _lin(p, mlp.down_proj), act)
                else:
                    out = _gated(h_in, _lin(h_in, mlp.gate_proj), _lin(h_in, mlp.up_proj),
                                 lambda p: _lin(p, mlp.down_proj), act)
                if family in ("olmo2", "gemma2"):
                    out = _rms(out, block.post_feedforward_layernorm, offset)
            resid[i] = _stab((mid[0] + out[0], mid[1] + out[1]))
    final = _ln(resid[-1], body.final_layer_norm) if neox else _rms(resid[-1], body.norm, offset)
    head = copy.lm_head
    logits = _lin(final, head)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = _act(logits, lambda x: torch.tanh(x / cap) * cap)
    return zs, logits[0]


def _plain_moe(pair, block, act, cfg):
    """Routing from the total: softmax of the router logits, top-k, renormalised where the family does
    (Mixtral always, Qwen3-MoE iff norm_topk_prob); each chosen expert by the gated rule, weighted."""
    total = pair[0] + pair[1]
    probs = torch.softmax(total @ block.gate.weight.double().T, -1)
    weights, chosen = torch.topk(probs, cfg.num_experts_per_tok)
    if getattr(cfg, "norm_topk_prob", True):
        weights = weights / weights.sum()
    experts = block.experts
    f = experts.gate_up_proj.shape[1] // 2
    out_b, out_g = torch.zeros_like(total), torch.zeros_like(total)
    for w, e in zip(weights, chosen.tolist()):
        W = experts.gate_up_proj[e].double()
        gate, up = (pair[0] @ W[:f].T, pair[1] @ W[:f].T), (pair[0] @ W[f:].T, pair[1] @ W[f:].T)
        down = experts.down_proj[e].double()
        eb, eg = _gated(pair, gate, up, lambda p: (p[0] @ down.T, p[1] @ down.T), act)
        out_b, out_g = out_b + w * eb, out_g + w * eg
    return out_b, out_g


PLAIN = ("qwen2", "qwen3", "olmo2", "gemma2", "gpt_neox", "phi3", "mixtral", "qwen3_moe")


@pytest.mark.parametrize("name", PLAIN)
def test_engine_beta_equals_a_plain_loop_on_the_independent_copy(name, root):
    model, copy, _ = matrix.loaded_family(name, root)
    ids = model.encode(PROMPTS[0])[:, :12]  # qwen2's tokenizer splits into characters: keep the loop short
    mu = _mu(model, ids.shape[1])
    with torch.no_grad():
        zs, logits = _plain(copy, name, ids, mu)
    hooks, beta_logits, _ = _engine_beta(Engine(model, "float64"), ids, mu)
    assert logits.abs().max() > 1e-3 and zs[1].abs().max() > 1e-3
    worst = max(_relative(hooks.z[layer][0], z) for layer, z in zs.items())
    worst = max(worst, _relative(beta_logits[-1], logits))
    # float64 on both sides, but the routing weights / soft-capped tables are computed by the model
    # modules in float32: 1e-6 leaves room for that and nothing for a wrong rule
    assert matrix.record(name, "cdt_plain_beta", worst, tolerance=1e-6) <= 1e-6, f"{name}: {worst:.2e}"


def test_a_family_without_cd_t_rules_is_one_clear_error(root):
    """A family the bridge boots but CD-T has no rules for (a state-space model): one message naming
    the supported families, not a raw AttributeError from a missing attention."""
    from analyses.cdt.arch import UnsupportedArchitectureError
    from families import UNCOVERED

    name = next(iter(UNCOVERED))
    model, _, _ = matrix.loaded_family(name, root)
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*GPT2LMHeadModel.*Qwen3MoeForCausalLM"):
        Engine(model)
