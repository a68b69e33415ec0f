"""CD-T oracles of the rules the architecture families add (docs/cdt.md, "Rules for the other families").

β itself (not only β + γ) against hand-computed cases, one per rule: q/k/v biases, QK-norm per head and
over the whole projection, post-norm-only blocks, attention logit soft-caps, parallel blocks, partial
rotary and MoE routing, for the two-stream engine and for the fast sweep's β-only copies (`fast.py`).
"""

from __future__ import annotations

import math

import torch

from analyses.cdt import fast, rules
from analyses.cdt.arch import LayerWeights, Moe, Norm
from analyses.cdt.engine import Hooks, RuleOptions
from cdt_oracle_helpers import F64, _attention_case, close, hand_engine, hand_pass, t


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
