"""CD-T oracles: β itself (not only β + γ) against hand-computed cases, one per rule.

Exactness (β + γ = the real activation) holds for any split, since γ takes the rest, so it cannot
catch a wrong β rule. Each test here feeds a rule a 2-4 number case whose β follows by hand from
the rule as docs/cdt.md states it (the arithmetic is written out), for the two-stream rules
(`rules.py`, the engine) and for the fast sweep's own β-only copies (`fast.py`). The rules the
architecture families add: tests/families/test_cdt_family_oracles.py; fast β == engine β and a plain loop-based
re-implementation on tiny models: tests/analyses/cdt/test_cdt_tiny_model_oracles.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from analyses.cdt import circuits, fast, rules
from analyses.cdt.arch import Norm
from analyses.cdt.engine import Engine, RuleOptions
from cdt_oracle_helpers import F64, _attention_case, close, hand_engine, hand_pass, t


# ---- linear with bias ----------------------------------------------------------------------------

def test_linear_bias_split_oracle():
    # β = [1, 0], γ = [0, 1], so βW = row 0 of W = [1, -2, 0] and γW = row 1 = [3, 1, 0].
    # Rule: β' = βW + b·|βW| / (|βW| + |γW|), γ' = γW + the rest of b.
    #   unit 0: b = 4, share 4·1/(1+3) = 1   → β' = 1 + 1 = 2,   γ' = 3 + 3 = 6
    #   unit 1: b = 6, share 6·2/(2+1) = 4   → β' = -2 + 4 = 2,  γ' = 1 + 2 = 3
    #   unit 2: both parts 0: the whole b = 5 goes to γ (spec pitfall 13) → β' = 0, γ' = 5
    W, b = t([1, -2, 0], [3, 1, 0]), t(4, 6, 5)
    beta, gamma = rules.linear((t(1, 0), t(0, 1)), W, b)
    close(beta, [1 + 1, -2 + 4, 0])
    close(gamma, [3 + 3, 1 + 2, 0 + 5])
    # per-head projection: the same numbers with W as [1 head, d_model 2, d_head 3]
    hb, hg = rules.linear_heads((t([[1, 0]]), t([[0, 1]])), W[None], b[None])
    close(hb, [2, 2, 0])
    close(hg, [6, 3, 5])
    # fast.py's copy: β' from βW and the total's xW (γW = total − βW)
    close(fast._share(t(1, -2, 0), t(1 + 3, -2 + 1, 0), b), [2, 2, 0])


# ---- LayerNorm / RMSNorm ------------------------------------------------------------------------

LN = Norm("layer", t(2, 1), t(4, 8), 0.0)  # eps 0 so the hand arithmetic is exact
LN_BETA, LN_GAMMA = t(3, 1), t(1, -1)


@pytest.mark.parametrize("split", ["input", "normalised"])
def test_layer_norm_oracle(split):
    # total = [4, 0]: mean 2, var ((4-2)² + (0-2)²)/2 = 4, σ = 2.
    # Centring is per part: β − mean β = [3-2, 1-2] = [1, -1]; γ − mean γ = [1-0, -1-0] = [1, -1].
    # Scaled by w/σ(total) = [2, 1]/2: β_n = [1, -0.5], γ_n = [1, -0.5].
    # Bias b = [4, 8]:
    #   "input" (reference prop_layer_norm): β's share b·|β|/(|β|+|γ|) of the *input* parts:
    #       unit 0: 4·3/(3+1) = 3, unit 1: 8·1/(1+1) = 4 → β' = [1+3, -0.5+4], γ' = [1+1, -0.5+4]
    #   "normalised": by |β_n|, |γ_n|: unit 0: 4·1/(1+1) = 2, unit 1: 8·0.5/(0.5+0.5) = 4
    #       → β' = [1+2, -0.5+4], γ' = [1+2, -0.5+4]
    # Either way β' + γ' = LN([4, 0]) = [(4-2)/2·2 + 4, (0-2)/2·1 + 8] = [6, 7].
    expected = {"input": ([1 + 3, -0.5 + 4], [1 + 1, -0.5 + 4]),
                "normalised": ([1 + 2, -0.5 + 4], [1 + 2, -0.5 + 4])}[split]
    beta, gamma = rules.norm((LN_BETA, LN_GAMMA), LN, split)
    close(beta, expected[0])
    close(gamma, expected[1])
    close(beta + gamma, [6, 7])
    normed, inv = fast._norm_total(LN_BETA + LN_GAMMA, LN)
    close(fast._norm_beta(LN_BETA, normed, inv, LN, LN_BETA + LN_GAMMA, split), expected[0])


def test_layer_norm_default_is_the_reference_input_split():
    assert RuleOptions().ln_bias == "input"
    close(rules.norm((LN_BETA, LN_GAMMA), LN)[0], [4, 3.5])
    with pytest.raises(ValueError):
        rules.norm((LN_BETA, LN_GAMMA), LN, "raw")


def test_rms_norm_oracle():
    # total = β + γ = [2-1, 4+3] = [1, 7]; mean square (1 + 49)/2 = 25, rms 5 (eps 0).
    # Rule: β' = β·w/rms(total) = [2·10/5, 4·5/5] = [4, 4]; γ' = [-1·10/5, 3·5/5] = [-2, 3].
    spec = Norm("rms", t(10, 5), None, 0.0)
    beta, gamma = rules.norm((t(2, 4), t(-1, 3)), spec)
    close(beta, [2 * 10 / 5, 4 * 5 / 5])
    close(gamma, [-1 * 10 / 5, 3 * 5 / 5])
    normed, inv = fast._norm_total(t(1, 7), spec)
    close(fast._norm_beta(t(2, 4), normed, inv, spec, t(1, 7)), [4, 4])


def test_rotary_oracle():
    # HF rotary on d_head 2 (halves of 1): rot(x) = x·cos + [-x1, x0]·sin, with cos 0.6, sin 0.8:
    #   β = [1, 2] → [0.6 - 2·0.8, 2·0.6 + 1·0.8] = [-1, 2]; γ = [2, 0] → [1.2, 1.6]
    cos, sin = t([0.6, 0.6]), t([0.8, 0.8])
    beta, gamma = rules.rotate((t(1, 2).reshape(1, 1, 1, 2), t(2, 0).reshape(1, 1, 1, 2)), cos, sin)
    close(beta, [0.6 - 2 * 0.8, 2 * 0.6 + 1 * 0.8])
    close(gamma, [2 * 0.6, 2 * 0.8])


# ---- attention ------------------------------------------------------------------------------------

# Shared derivation. Position 0 sees only key 0: every pattern row 0 is [1, 0].
# Position 1, totals: q1 = [2 ln3, 0], k0 = k1 = [1, 0] → scores 0.5·2 ln3 = ln3 for both keys
#   → P1 = [1/2, 1/2]; v_total = [[4, 4], [4, 8]] → z_total = [[4, 4], [(4+4)/2, (4+8)/2]] = [[4, 4], [4, 6]].
# "paper": β scores at position 1 = 0.5·(βq1·βk0, βq1·βk1) = (0, ln3) → β pattern (1/4, 3/4);
#   β_z = [βv0, 1/4·βv0 + 3/4·βv1] = [[4, 0], [1, 6]], γ_z = z_total − β_z = [[0, 4], [3, 0]].
# "value_only": β_z = P βv = [[4, 0], [(4+0)/2, (0+8)/2]] = [[4, 0], [2, 4]], γ_z = [[0, 4], [2, 2]].
ATTENTION = {"paper": ([[4, 0], [4 / 4, 3 / 4 * 8]], [[0, 4], [4 - 1, 6 - 6]]),
             "value_only": ([[4, 0], [4 / 2, 8 / 2]], [[0, 4], [4 - 2, 6 - 4]])}


@pytest.mark.parametrize("rule", ["paper", "value_only"])
def test_attention_oracle(rule):
    q, k, v, scale, visible = _attention_case()
    (beta, gamma), pattern = rules.attention(q, k, v, scale, visible, rule)
    close(pattern, [[1, 0], [0.5, 0.5]])
    close(beta, ATTENTION[rule][0])
    close(gamma, ATTENTION[rule][1])
    # fast.py's copy, from β of q/k/v and the clean pattern
    close(fast._attention_beta(q[0], k[0], v[0], pattern, scale, visible, rule), ATTENTION[rule][0])


def test_gqa_expansion_oracle():
    # 4 query heads, 2 KV heads: query head h reads KV head h // 2 → KV values [7, 9] → [7, 7, 9, 9].
    engine = hand_engine(group_size=2)
    kv = t(7, 9).reshape(1, 1, 2, 1)
    beta, gamma = engine._expand_kv((kv, -kv))
    close(beta, [7, 7, 9, 9])
    close(gamma, [-7, -7, -9, -9])
    close(hand_pass(engine)._expand(kv), [7, 7, 9, 9])


def test_sliding_window_mask_oracle():
    # window 2: query i sees keys j with i - 2 < j ≤ i
    close(rules.attention_mask(3, 2, torch.device("cpu")).to(F64), [[1, 0, 0], [1, 1, 0], [0, 1, 1]], atol=0)


# ---- activation -----------------------------------------------------------------------------------

def _silu(x: float) -> float:
    return x / (1 + math.exp(-x))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("name", ["relu", "silu", "gelu_tanh"])
def test_activation_oracle(name):
    # Rule (irrelevant part first): γ' = act(γ), β' = act(β + γ) − act(γ).
    beta, gamma = t(3, -1, 1), t(-2, 2, 1)  # totals [1, 1, 2]
    if name == "relu":
        # γ' = relu([-2, 2, 1]) = [0, 2, 1]; β' = relu([1, 1, 2]) − γ' = [1, -1, 1]
        act = torch.relu
        expected_gamma, expected_beta = [0, 2, 1], [1 - 0, 1 - 2, 2 - 1]
    else:
        f, act = {"silu": (_silu, torch.nn.functional.silu),
                  "gelu_tanh": (_gelu_tanh, lambda x: torch.nn.functional.gelu(x, approximate="tanh"))}[name]
        expected_gamma = [f(-2), f(2), f(1)]
        expected_beta = [f(1) - f(-2), f(1) - f(2), f(2) - f(1)]
    b, g = rules.activation((beta, gamma), act)
    close(b, expected_beta)
    close(g, expected_gamma)
    close(fast._activation_beta(beta, beta + gamma, act), expected_beta)


# ---- gated product --------------------------------------------------------------------------------

# act(gate) = (βa, γa) = ([1, -1], [0, 2]) (totals [1, 1]); up = (βu, γu) = ([2, 1], [1, 3]) (totals [3, 4]);
# total product = [1·3, 1·4] = [3, 4].
#   relevant_only: β = βa βu = [2, -1], γ = [3-2, 4+1] = [1, 5]
#   symmetric: β = βaβu + ½(βaγu + γaβu) = [2 + ½(1 + 0), -1 + ½(-3 + 2)] = [2.5, -1.5], γ = [0.5, 5.5]
#   irrelevant_first: γ = γa γu = [0, 6], β = [3-0, 4-6] = [3, -2]
PRODUCT = {"relevant_only": ([2, -1], [1, 5]),
           "symmetric": ([2 + 0.5 * (1 + 0), -1 + 0.5 * (-3 + 2)], [3 - 2.5, 4 + 1.5]),
           "irrelevant_first": ([3 - 0, 4 - 6], [0, 6])}


@pytest.mark.parametrize("mode", list(PRODUCT))
def test_product_oracle(mode):
    a, u = (t(1, -1), t(0, 2)), (t(2, 1), t(1, 3))
    beta, gamma = rules.product(a, u, mode)
    close(beta, PRODUCT[mode][0])
    close(gamma, PRODUCT[mode][1])
    close(fast._product(a[0], a[0] + a[1], u[0], u[0] + u[1], mode), PRODUCT[mode][0])


# ---- stabiliser -----------------------------------------------------------------------------------

def test_stabiliser_oracle():
    # where β·γ < 0 the larger part takes the sum, the other gets 0; same signs are kept:
    #   (3, -1) → (2, 0); (-1, 4) → (0, 3); (2, 5) → (2, 5); (-3, 0) → unchanged
    beta, gamma = t(3, -1, 2, -3), t(-1, 4, 5, 0)
    b, g = rules.stabilise((beta, gamma))
    close(b, [3 - 1, 0, 2, -3])
    close(g, [0, 4 - 1, 5, 0])
    close(fast._stabilise(beta, beta + gamma), [2, 0, 2, -3])


# ---- MLP blocks (the engine's and the fast pass's wiring of the rules above) ----------------------

def _mlp_engine(gated: bool, product: str = "relevant_only") -> Engine:
    # ln2: RMSNorm, w = 1, eps 0, on total [1, 1] (rms 1): the norm passes β = [1, 0], γ = [0, 1] unchanged.
    eye = torch.eye(2, dtype=F64)
    relu_in = t([3, -1], [-2, 2])  # rows: what β = e0 and γ = e1 become: ([3, -1], [-2, 2])
    layer = SimpleNamespace(ln2=Norm("rms", t(1, 1), None, 0.0), b_in=None, b_gate=None, b_out=None,
                            W_out=eye, act=torch.relu, post_mlp_norm=None,
                            W_in=t([2, 1], [1, 3]) if gated else relu_in, W_gate=relu_in if gated else None)
    return hand_engine(RuleOptions(product=product, stabilise=False), layers=[layer])


@pytest.mark.parametrize("gated,product", [(False, "relevant_only"), (True, "relevant_only"),
                                           (True, "symmetric"), (True, "irrelevant_first")])
def test_mlp_block_oracle(gated, product):
    # plain: up = ([3, -1], [-2, 2]) → relu rule → β = [1, -1] (test_activation_oracle) → W_out = I.
    # gated: relu(gate) = ([1, -1], [0, 2]), up = ([2, 1], [1, 3]) → PRODUCT[product] → W_out = I.
    expected = PRODUCT[product][0] if gated else [1, -1]
    engine = _mlp_engine(gated, product)
    beta, gamma = engine.mlp_block(0, (t([[1, 0]]), t([[0, 1]])), None)
    close(beta, expected)
    close(beta + gamma, [1, 1] if not gated else [3, 4])
    fast_beta, _ = hand_pass(engine).mlp(0, t([[[1, 0]]]), t([[1, 1]]))
    close(fast_beta, expected)


# ---- embedding and unembedding --------------------------------------------------------------------

def test_embedding_oracle():
    # W_E rows [1,2], [3,4], [5,6]; positions [10,20], [30,40]; ids [2, 0]; word 0 relevant:
    #   β = [W_E[2], 0] = [[5, 6], [0, 0]]; γ = [pos0, W_E[0] + pos1] = [[10, 20], [1+30, 2+40]]
    engine = hand_engine(W_E=t([1, 2], [3, 4], [5, 6]), embed_scale=1.0, W_pos=t([10, 20], [30, 40]))
    ids = torch.tensor([[2, 0]])
    beta, gamma = engine.embed_pair(ids, torch.tensor([[True, False]]))
    close(beta, [[5, 6], [0, 0]])
    close(gamma, [[10, 20], [1 + 30, 2 + 40]])
    beta, gamma = engine.embed_pair(ids)  # no source: β = 0, γ = everything
    close(beta, [[0, 0], [0, 0]])
    close(gamma, [[5 + 10, 6 + 20], [1 + 30, 2 + 40]])
    # Gemma-style: token embedding × scale, no learned positions
    scaled = hand_engine(W_E=t([1, 2], [3, 4], [5, 6]), embed_scale=2.0, W_pos=None)
    beta, gamma = scaled.embed_pair(ids, torch.tensor([[True, False]]))
    close(beta, [[10, 12], [0, 0]])
    close(gamma, [[0, 0], [2, 4]])


def _unembed_engine(softcap: float | None = None, ln_final: Norm | None = None) -> Engine:
    return hand_engine(W_U=t([2, 0, 1], [1, 3, 0]), b_U=t(3, 6, 9), logit_softcap=softcap,
                       ln_final=ln_final or Norm("rms", t(1, 1), None, 0.0))


# normed β = [1, 0], γ = [0, 1]: βW_U = [2, 0, 1], γW_U = [1, 3, 0]; b_U = [3, 6, 9] split as for linear:
#   β shares 3·2/3 = 2, 6·0/3 = 0, 9·1/1 = 9 → β = [4, 0, 10], γ = [1+1, 3+6, 0] = [2, 9, 0]
UNEMBED_BETA, UNEMBED_GAMMA = [2 + 2, 0 + 0, 1 + 9], [1 + 1, 3 + 6, 0 + 0]


def test_unembedding_oracle():
    normed = (t([[1, 0]]), t([[0, 1]]))
    beta, gamma = _unembed_engine().unembed(normed)
    close(beta, UNEMBED_BETA)
    close(gamma, UNEMBED_GAMMA)
    beta, _ = _unembed_engine().unembed(normed, columns=torch.tensor([2, 0]))
    close(beta, [10, 4])
    # soft-cap c = 10 by the activation rule: β' = c·tanh(total/c) − c·tanh(γ/c), totals [6, 9, 10]
    beta, gamma = _unembed_engine(10.0).unembed(normed)
    close(beta, [10 * math.tanh(0.6) - 10 * math.tanh(0.2), 10 * math.tanh(0.9) - 10 * math.tanh(0.9),
                 10 * math.tanh(1.0) - 0])
    close(gamma, [10 * math.tanh(0.2), 10 * math.tanh(0.9), 0])


def test_logit_diff_oracle_two_stream_and_fast():
    # β of logit(good = 2) − logit(bad = 0) at the last position: 10 − 4 = 6 (UNEMBED_BETA)
    engine = _unembed_engine()
    good, bad = torch.tensor([2]), torch.tensor([0])
    lb, lg = circuits.logit_diff_pair(engine, (t([[1, 0]]), t([[0, 1]])), good, bad, 1)
    close(lb, [10 - 4])
    close(lg, [0 - 2])
    passer = hand_pass(engine)
    passer.final_total = t([[1, 1]])  # final resid total [P 1, T 1, d 2]; its rms is 1
    close(passer.logit_diff_beta(t([[[1, 0]]]), good, bad), [10 - 4])
    # soft-capped (c = 10): β = [10 tanh(1)] − [10 tanh(.6) − 10 tanh(.2)]
    capped = hand_pass(_unembed_engine(10.0))
    capped.final_total = t([[1, 1]])
    close(capped.logit_diff_beta(t([[[1, 0]]]), good, bad),
          [10 * math.tanh(1.0) - (10 * math.tanh(0.6) - 10 * math.tanh(0.2))])


@pytest.mark.parametrize("split", ["input", "normalised"])
def test_final_layer_norm_in_the_fast_read_out(split):
    # ln_final = LN above (w [2, 1], b [4, 8]) on β = [3, 1], total [4, 0]: β_normed = [4, 3.5] ("input")
    # or [3, 3.5] ("normalised") (test_layer_norm_oracle); W_U = I, no b_U: β logit diff(0 − 1) = 0.5 or -0.5.
    engine = hand_engine(RuleOptions(ln_bias=split), W_U=torch.eye(2, dtype=F64), b_U=None, logit_softcap=None,
                         ln_final=LN)
    passer = hand_pass(engine)
    passer.final_total = (LN_BETA + LN_GAMMA).reshape(1, 1, 2)
    expected = {"input": 4 - 3.5, "normalised": 3 - 3.5}[split]
    close(passer.logit_diff_beta(LN_BETA.reshape(1, 1, 1, 2), torch.tensor([0]), torch.tensor([1])), [expected])
    close(engine.apply_final_norm((LN_BETA, LN_GAMMA))[0], {"input": [4, 3.5], "normalised": [3, 3.5]}[split])
