"""CD-T oracles: β itself (not only β + γ) against hand-computed cases, one per rule.

Exactness (β + γ = the real activation) holds for any split, since γ takes the rest, so it cannot
catch a wrong β rule. Each test here feeds a rule a 2-4 number case whose β follows by hand from
the rule as docs/cdt.md states it (the arithmetic is written out), for the two-stream rules
(`rules.py`, the engine) and for the fast sweep's own β-only copies (`fast.py`). Then: fast β ==
engine β on tiny models (β itself, at every later head and the logits), and a plain loop-based
re-implementation of the rules, written from docs/cdt.md against the Hugging Face modules (not
`rules.py` or `arch.py`), == the engine's β for one source head on tiny GPT-2 and tiny Llama/GQA.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from analyses.cdt import circuits, fast, rules
from analyses.cdt.arch import Norm
from analyses.cdt.engine import Engine, Hooks, RuleOptions

F64 = torch.float64
LN3 = math.log(3.0)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64).reshape(actual.shape), atol=atol, rtol=0)


def hand_engine(options: RuleOptions | None = None, **weights) -> Engine:
    """An Engine over hand-set weights (no model): only the fields a test's pieces read."""
    engine = Engine.__new__(Engine)
    engine.model, engine.dtype, engine.device = None, F64, torch.device("cpu")
    engine.options = options or RuleOptions()
    engine.w = SimpleNamespace(**weights)
    return engine


def hand_pass(engine: Engine) -> fast.BetaPass:
    """A fast.BetaPass over the same hand-set weights, with an empty totals cache."""
    passer = fast.BetaPass.__new__(fast.BetaPass)
    passer.engine, passer.w, passer.options, passer.memo = engine, engine.w, engine.options, {}
    return passer


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

def _attention_case():
    """Two positions, one head, d_head 2, scale 0.5 (shapes [B 1, T 2, H 1, d 2])."""
    def bt(*rows):
        return t(*rows).reshape(1, 2, 1, 2)

    q = (bt([1, 1], [2 * LN3, 0]), bt([0, 0], [0, 0]))
    k = (bt([0, 0], [1, 0]), bt([1, 0], [0, 0]))
    v = (bt([4, 0], [0, 8]), bt([0, 4], [4, 0]))
    return q, k, v, 0.5, rules.attention_mask(2, None, torch.device("cpu"))


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
    close(engine.final_norm((LN_BETA, LN_GAMMA))[0], {"input": [4, 3.5], "normalised": [3, 3.5]}[split])


# ---- tiny models: fast β == engine β, and an independent loop-based implementation ----------------

PROMPT = "the capital of mary is the book of john and the key"
SOURCE_LAYER, SOURCE_HEAD = 0, 1


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


class _EngineSource(Hooks):
    def __init__(self, mu: torch.Tensor) -> None:
        self.mu, self.z, self.qkv = mu, {}, {}

    def on_qkv(self, layer, q, k, v):
        self.qkv[layer] = (q[0], k[0], v[0])

    def on_z(self, layer, z):
        if layer == SOURCE_LAYER:
            beta, gamma = z[0].clone(), z[1].clone()
            total = beta + gamma
            beta[:, :, SOURCE_HEAD] = total[:, :, SOURCE_HEAD] - self.mu
            gamma[:, :, SOURCE_HEAD] = self.mu
            z = (beta, gamma)
        self.z[layer] = z[0]
        return z


class _FastSource(fast.FastHooks):
    def __init__(self, mu: torch.Tensor) -> None:
        self.mu, self.z, self.qkv = mu, {}, {}

    def on_qkv(self, layer, q, k, v):
        self.qkv[layer] = (q[0, 0], k[0, 0], v[0, 0])  # [S 1, P 1, ...] → [T, heads, d]

    def on_z(self, layer, beta, total):
        if layer == SOURCE_LAYER:
            beta = torch.zeros((1, *total.shape), dtype=total.dtype)
            beta[..., SOURCE_HEAD, :] = total[..., SOURCE_HEAD, :] - self.mu
        if beta is not None:
            self.z[layer] = beta[0, 0]
        return beta


def _engine_beta(engine: Engine, ids: torch.Tensor, mu: torch.Tensor):
    hooks = _EngineSource(mu)
    (beta_logits, _), record = engine.decompose(ids, hooks=hooks, record=True)
    return hooks, beta_logits[0], record


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


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


# ---- rules the architecture families add (docs/cdt.md, "Rules for the other families") -------------

from analyses.cdt.arch import LayerWeights, Moe  # noqa: E402


def hand_layer(**fields) -> LayerWeights:
    """A LayerWeights with every field None/neutral except those given (d_model = d_head = 2, one head)."""
    eye = torch.eye(2, dtype=F64)[None]
    base = dict(ln1=None, W_Q=eye, b_Q=None, W_K=eye, b_K=None, W_V=eye, b_V=None, W_O=torch.eye(2, dtype=F64)[None],
                b_O=None, q_norm=None, k_norm=None, post_attn_norm=None, ln2=None, W_in=None, b_in=None, W_gate=None,
                b_gate=None, W_out=None, b_out=None, act=None, post_mlp_norm=None, attn_scale=0.5, window=None,
                rope_kind=None)
    base.update(fields)
    return LayerWeights(**base)


class _QKV(Hooks):
    def on_qkv(self, layer, q, k, v):
        self.q, self.k, self.v = q, k, v


def test_qkv_bias_oracle():
    # Qwen2: q/k/v projections with biases follow the linear rule per unit (bias split by |βxW|, |γxW|).
    # W_Q = W_K = W_V = I; b_Q = [4, 6], b_K = [4, 0], b_V = [4, 2]; no pre-norm.
    # pos 0: βx = [1, 0], γx = [0, 1] → β's share of b = [b0·1/(1+0), b1·0/(0+1)] = [b0, 0]
    #   βq0 = [1+4, 0], βk0 = [1+4, 0], βv0 = [1+4, 0]
    # pos 1: βx = [2, 0], γx = [2, 1] → share = [b0·2/(2+2), b1·0/(0+1)] = [b0/2, 0]
    #   βq1 = [2+2, 0], βk1 = [2+2, 0], βv1 = [2+2, 0]
    # β scores at pos 1 = 0.5·(βq1·βk0, βq1·βk1) = (10, 8) → β pattern (e²/(e²+1), 1/(e²+1))
    #   β_z1 = p0·[5, 0] + p1·[4, 0] = [4 + p0, 0]; β_z0 = βv0 = [5, 0]
    layer = hand_layer(b_Q=t(4, 6)[None], b_K=t(4, 0)[None], b_V=t(4, 2)[None])
    engine = hand_engine(layers=[layer], group_size=1)
    hooks = _QKV()
    x = (t([1, 0], [2, 0])[None], t([0, 1], [2, 1])[None])
    engine.attention_block(0, x, hooks, record := {})
    close(hooks.q[0], [[5, 0], [4, 0]])
    close(hooks.k[0], [[5, 0], [4, 0]])
    close(hooks.v[0], [[5, 0], [4, 0]])
    close(hooks.q[0] + hooks.q[1], [[1 + 4, 1 + 6], [4 + 4, 1 + 6]])
    p0 = math.exp(2) / (math.exp(2) + 1)
    close(record["blocks.0.attn.hook_z"][0], [[5, 0], [4 + p0, 0]])
    # fast.py: the same projection through BetaPass._linear (β of q from βx and the total)
    beta_q, _ = hand_pass(engine)._linear(0, "q", x[0][None], x[0] + x[1], layer.W_Q, layer.b_Q, heads=True)
    close(beta_q[0], [[5, 0], [4, 0]])


# q/k norm on [B 1, T 1, 2 heads, d_head 2]: head 0 β [2, 4], γ [-1, 3] (total [1, 7], rms 5);
# head 1 β [1, 0], γ [0, 1] (total [1, 1], rms 1).
QK_BETA, QK_GAMMA = t([2, 4], [1, 0]).reshape(1, 1, 2, 2), t([-1, 3], [0, 1]).reshape(1, 1, 2, 2)


def test_qk_norm_per_head_oracle():
    # Qwen3 / Gemma 3: RMS rule per head with w = [10, 5]:
    #   head 0: β·w/5 = [2·10/5, 4·5/5] = [4, 4]; head 1: β·w/1 = [10, 0]
    spec = Norm("rms", t(10, 5), None, 0.0)
    beta, gamma = rules.norm_heads((QK_BETA, QK_GAMMA), spec, whole=False)
    close(beta, [[4, 4], [10, 0]])
    close(gamma, [[-2, 3], [0, 5]])
    fast_beta, _ = hand_pass(hand_engine())._norm(0, "q_norm", QK_BETA, QK_BETA + QK_GAMMA, spec)
    close(fast_beta, [[4, 4], [10, 0]])


def test_qk_norm_over_the_whole_projection_oracle():
    # OLMo-2: one RMS over all heads' dims, total [1, 7, 1, 1]: mean square (1+49+1+1)/4 = 13, rms √13;
    # w = [10, 5, 2, 4]: β = [2·10, 4·5, 1·2, 0·4]/√13 = [20, 20, 2, 0]/√13
    spec = Norm("rms", t(10, 5, 2, 4), None, 0.0)
    r = math.sqrt(13)
    beta, gamma = rules.norm_heads((QK_BETA, QK_GAMMA), spec, whole=True)
    close(beta, [[20 / r, 20 / r], [2 / r, 0]])
    close(gamma, [[-10 / r, 15 / r], [0, 4 / r]])
    fast_beta, _ = hand_pass(hand_engine())._norm(0, "q_norm", QK_BETA, QK_BETA + QK_GAMMA, spec, whole=True)
    close(fast_beta, [[20 / r, 20 / r], [2 / r, 0]])


def test_post_norm_only_block_oracle():
    # OLMo-2: no pre-norms (each sublayer reads the raw residual), RMS rule on each sublayer's output
    # before the residual add. One position: attention z = v = resid (W_V = W_O = I), so
    #   attn out before the norm: β [2, 4], γ [-1, 3], total [1, 7] (rms 5); post_attn w = [10, 5]
    #   → β [4, 4], γ [-2, 3]; mid β [6, 8], γ [-3, 6], total [3, 14]
    #   MLP (no pre-norm, ReLU, W_in = W_out = I): γ' = relu(γ) = [0, 6], β' = relu([3, 14]) − γ' = [3, 8];
    #   post-MLP norm w = [1, 1] on total [3, 14]: rms r = √((9+196)/2) → β [3/r, 8/r]
    #   resid post β = [6 + 3/r, 8 + 8/r]
    eye = torch.eye(2, dtype=F64)
    layer = hand_layer(post_attn_norm=Norm("rms", t(10, 5), None, 0.0), post_mlp_norm=Norm("rms", t(1, 1), None, 0.0),
                       W_in=eye, W_out=eye, act=torch.relu)
    engine = hand_engine(RuleOptions(stabilise=False), layers=[layer], group_size=1)
    resid = (t([[2, 4]]), t([[-1, 3]]))
    record: dict = {}
    beta, gamma = engine.block(0, resid, None, record)
    r = math.sqrt((9 + 196) / 2)
    close(record["blocks.0.hook_attn_out"][0], [4, 4])
    close(beta, [6 + 3 / r, 8 + 8 / r])
    close(beta + gamma, [3 + 3 / r, 14 + 14 / r])
    passer = hand_pass(engine)
    passer.memo[(0, "resid_pre")] = t([[1, 7]])
    close(passer.layer(0, t([[[2, 4]]]), None)[0], [6 + 3 / r, 8 + 8 / r])


def test_attention_logit_softcap_oracle():
    # Gemma 2: scores → c·tanh(s/c) before the mask, in the β softmax and in the total's.
    # _attention_case with c = 1: total scores at position 1 are (ln3, ln3) → (0.8, 0.8) (tanh(ln 3) = 0.8):
    #   P1 still [1/2, 1/2]; β scores (0, ln3) → (0, 0.8) → β pattern (1/(1+e^.8), e^.8/(1+e^.8));
    #   β_z1 = p0·βv0 + p1·βv1 = [4·p0, 8·p1]; row 0 sees key 0 only (the mask comes after the cap).
    q, k, v, scale, visible = _attention_case()
    (beta, gamma), pattern = rules.attention(q, k, v, scale, visible, "paper", cap=1.0)
    p1 = math.exp(0.8) / (1 + math.exp(0.8))
    close(pattern, [[1, 0], [0.5, 0.5]])
    close(beta, [[4, 0], [4 * (1 - p1), 8 * p1]])
    close(beta + gamma, [[4, 4], [4, 6]])
    close(fast._attention_beta(q[0], k[0], v[0], pattern, scale, visible, "paper", cap=1.0),
          [[4, 0], [4 * (1 - p1), 8 * p1]])


def test_parallel_block_oracle():
    # GPT-NeoX: attention and MLP both read the block input: resid + attn(resid) + mlp(resid).
    # resid β [1, 0], γ [0, 1]; attention on one position with W_V = W_O = I adds the resid again.
    # MLP (ReLU, W_in rows [3, -1], [-2, 2], W_out = I) on the *block input*: up β [3, -1], γ [-2, 2],
    #   total [1, 1] → β' = relu([1, 1]) − relu([-2, 2]) = [1, -1]   (on mid = 2·resid it would be [2, -2])
    # resid post β = 2·[1, 0] + [1, -1] = [3, -1]; total [3, 3].
    layer = hand_layer(W_in=t([3, -1], [-2, 2]), W_out=torch.eye(2, dtype=F64), act=torch.relu, parallel=True)
    engine = hand_engine(RuleOptions(stabilise=False), layers=[layer], group_size=1)
    beta, gamma = engine.block(0, (t([[1, 0]]), t([[0, 1]])))
    close(beta, [3, -1])
    close(beta + gamma, [3, 3])
    passer = hand_pass(engine)
    passer.memo[(0, "resid_pre")] = t([[1, 1]])
    close(passer.layer(0, t([[[1, 0]]]), None)[0], [3, -1])


def test_partial_rotary_oracle():
    # GPT-NeoX: rotary on the first r = 2 of d_head 4 dims (cos/sin are [T, r]); the other dims pass.
    #   [1, 2 | 5, 7] → [1·0.6 − 2·0.8, 2·0.6 + 1·0.8 | 5, 7] = [-1, 2, 5, 7]
    cos, sin = t([0.6, 0.6]), t([0.8, 0.8])
    beta, gamma = rules.rotate((t(1, 2, 5, 7).reshape(1, 1, 1, 4), t(0, 0, 1, 0).reshape(1, 1, 1, 4)), cos, sin)
    close(beta, [0.6 - 2 * 0.8, 2 * 0.6 + 1 * 0.8, 5, 7])
    close(gamma, [0, 0, 1, 0])


def _moe_case():
    """2 experts (gated ReLU, W_gate = W_down = I; W_up = I for expert 0, 2I for expert 1). The router
    picks by the sign of its input's first unit: x0 > 0 → experts (1, 0) with weights (0.75, 0.25),
    else expert 0 alone; it records what it was given."""
    eye = torch.eye(2, dtype=F64)
    seen = []

    def route(x):
        seen.append(x.clone())
        first = x[:, 0] > 0
        weights = torch.where(first[:, None], t(0.75, 0.25), t(1.0, 0.0))
        chosen = torch.where(first[:, None], torch.tensor([1, 0]), torch.tensor([0, 1]))
        return weights, chosen

    moe = Moe(route, torch.stack([eye, eye]), torch.stack([eye, 2 * eye]), torch.stack([eye, eye]), torch.relu, 2, True)
    return moe, seen


def test_moe_oracle():
    # x β [-1, 2], γ [3, 0], total [2, 2]: the router runs on the total (x0 = 2 > 0 → experts 1, 0 weighted
    # 0.75, 0.25; on β alone it would pick expert 0). Per expert, the gated rule (relevant_only, no stabiliser):
    #   relu(gate): γa = relu(γ) = [3, 0], βa = relu([2, 2]) − γa = [-1, 2]
    #   expert 0, up = x: β = βa·βu = [-1·-1, 2·2] = [1, 4], total [2·2, 2·2] = [4, 4]
    #   expert 1, up = 2x: βu [-2, 4] → β = [2, 8], total [2·4, 2·4] = [8, 8]
    # MoE β = 0.75·[2, 8] + 0.25·[1, 4] = [1.75, 7]; total 0.75·8 + 0.25·4 = [7, 7]
    moe, seen = _moe_case()
    engine = hand_engine(RuleOptions(stabilise=False))
    x = (t([[-1, 2]]), t([[3, 0]]))
    beta, gamma = engine.moe(x, moe)
    close(seen[-1], [2, 2])
    close(beta, [0.75 * 2 + 0.25 * 1, 0.75 * 8 + 0.25 * 4])
    close(beta + gamma, [7, 7])
    fast_beta, fast_total = hand_pass(engine)._moe(0, "", t([[[-1, 2]]]), t([[2, 2]]), moe)
    close(seen[-1], [2, 2])
    close(fast_beta, [1.75, 7])
    close(fast_total, [7, 7])
