"""Shared pieces of the CD-T oracle tests (tests/*/test_cdt_*_oracles.py, tests/families/test_cdt_families.py).

Float64 tensors written as rows (`t`), an exact comparison (`close`), an Engine and a fast.BetaPass over
hand-set weights (no model), the two-position attention case, and the hooks that make one source head
relevant (β = z − μ at L0H1) in the engine and in the fast pass, so their β can be compared.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from analyses.cdt import fast, rules
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


def _attention_case():
    """Two positions, one head, d_head 2, scale 0.5 (shapes [B 1, T 2, H 1, d 2])."""
    def bt(*rows):
        return t(*rows).reshape(1, 2, 1, 2)

    q = (bt([1, 1], [2 * LN3, 0]), bt([0, 0], [0, 0]))
    k = (bt([0, 0], [1, 0]), bt([1, 0], [0, 0]))
    v = (bt([4, 0], [0, 8]), bt([0, 4], [4, 0]))
    return q, k, v, 0.5, rules.attention_mask(2, None, torch.device("cpu"))


SOURCE_LAYER, SOURCE_HEAD = 0, 1


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
