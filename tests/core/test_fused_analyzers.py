"""Analyzers on the fused path (probe/fused.py): their results == the bridge's (`fused_routing = False`).

Ships on the planted refusal model, batched generation inside `intervene()`, factual's first-token logits,
successor's causal check, CD-T's path patching and task accuracy, retrieval's masking and Duo's NIAH with
streaming heads: each runs once on the bridge and once with its forwards on the fused path (the fused
blocks entered are counted); the results are equal within 1e-4 relative (tokens and answers exactly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fused_helpers import ROWS, RTOL, _bridge_only
from fused_helpers import root  # a fixture: pytest finds it in this module
from matrix import loaded_family, record
from probe.heads import Head
from probe.interventions import head_means, intervene, mean_ablation, scale, uniform_attention, zero_ablation


# ---- analyzers on the fused path: their results == the bridge's (fused_routing = False) ---------------

@contextlib.contextmanager
def _entries(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts `probe.fused.fused` blocks entered (every fused forward, routed or partial, enters one)."""
    import probe.fused as module

    entered: list[int] = []
    real = module.fused
    monkeypatch.setattr(module, "fused", lambda *a, **k: entered.append(1) or real(*a, **k))
    yield entered
    monkeypatch.setattr(module, "fused", real)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_ships_scores_on_the_fused_path_equal_the_bridges(name, monkeypatch):
    """Ships (`analyses.safety.ships_query`, both ablations: ε query scaling and output scaling) on the planted
    refusal model (GQA Llama; GPT-NeoX: fused QKV, parallel block), its clean pass and ablated partial
    forwards on the fused path, == the bridge's scores, ≤ 1e-4 of the largest."""
    from analyses import safety
    from analyses.planted import SAFETY_HARMFUL_PROMPTS, safety_model

    model = safety_model(name)
    ids = model.encode(SAFETY_HARMFUL_PROMPTS[0])
    for ablation in ("query", "output"):
        with _bridge_only(model):
            bridge = safety.ships_query(model, ids, ablation, 1e-5)
        with _entries(monkeypatch) as entered:
            ours = safety.ships_query(model, ids, ablation, 1e-5)
        assert len(entered) >= 2  # the clean pass and the ablated batches
        size = float(bridge.nan_to_num().abs().max())
        assert size > 1e-3
        worst = float((ours - bridge).nan_to_num().abs().max()) / size
        assert record(name, f"ships {ablation} fused vs bridge", worst, tolerance=RTOL) <= RTOL


def test_batched_generation_runs_on_the_fused_path_inside_intervene(root, monkeypatch):
    """`probe.generation.greedy_generate` (safety's and factual's generation) in a left-padded batch inside an
    `intervene()` block (zero, uniform, query scaling) == the bridge's tokens."""
    from probe.generation import greedy_generate

    model, _, _ = loaded_family("llama", root)
    texts = list(ROWS)
    interventions = [zero_ablation([Head(1, 1), Head(0, 2)]), uniform_attention([Head(1, 0)]),
                     scale([Head(0, 3)], "query", 1e-5)]
    with intervene(model, interventions):
        with _bridge_only(model):
            expected = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
        with _entries(monkeypatch) as entered:
            got = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
    assert entered == [1] and got == expected
    with _bridge_only(model):
        clean = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
    assert clean != expected  # the interventions change the tokens


def test_factual_successor_and_cdt_forwards_on_the_fused_path_equal_the_bridges(monkeypatch):
    """The analyzer forwards that read one position now ask `model.logits(..., positions="last")` inside their
    `intervene()` blocks (fused path, one unembedded row): factual's first-token logits (planted factual
    model, value scaling), successor's causal-check probabilities (mean ablation) and CD-T's path patching
    (every head frozen by resample + one sender mean-ablated per row; planted induction model) and task
    accuracy == the bridge's, ≤ 1e-4 relative."""
    from analyses import factual, successor
    from analyses.cdt import patching, tasks
    from analyses.cdt.circuits import batch_means
    from analyses.data.capitals import Capital
    from analyses.planted.factual import PLANTED_TABLE, planted_factual_model
    from analyses.planted.induction import induction_batch, planted_induction_model

    def both(model: Any, run: Any) -> tuple[Any, Any, int]:
        with _bridge_only(model):
            bridge = run()
        with _entries(monkeypatch) as entered:
            ours = run()
        return bridge, ours, len(entered)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).nan_to_num().abs().max() / b.nan_to_num().abs().max().clamp(min=1e-6))

    model = planted_factual_model()
    pool = [Capital(country, city) for country, city in PLANTED_TABLE]
    prompts = factual.build_counterfactuals(model.tokenizer, pool, 6, seed=3).prompts
    heads = model.all_heads()[:3]
    (pair_b, arg_b), (pair_f, arg_f), n = both(model, lambda: factual.first_token_logits(
        model, prompts, [scale(heads, "value", -1.5)]))
    assert n >= 1 and torch.equal(arg_b, arg_f) and rel(pair_f, pair_b) <= RTOL
    texts = [{"text": "alice bob", "answer_id": 3}, {"text": "bob alice", "answer_id": 4}]
    means = head_means(model, [model.encode(t["text"]) for t in texts], heads)
    probs_b, probs_f, n = both(model, lambda: successor.causal._answer_probabilities(model, texts, [[mean_ablation(heads, means)]])[0])
    assert n >= 1 and rel(probs_f, probs_b) <= RTOL

    induction = planted_induction_model()
    batch = induction_batch(induction, n=4)
    mu = [batch_means(induction, batch)]
    scores_b, scores_f, n = both(induction, lambda: patching.path_patching_scores(induction, [batch], None, mu))
    assert n >= 2 and float(scores_b.nan_to_num().abs().max()) > 1e-3 and rel(scores_f, scores_b) <= RTOL
    acc_b, acc_f, n = both(induction, lambda: tasks.accuracy(induction, [batch]))
    assert n >= 1 and acc_b.keys() == acc_f.keys()
    assert all(abs(acc_f[k] - acc_b[k]) <= RTOL * max(1.0, abs(acc_b[k])) for k in acc_b)


def test_retrieval_masking_runs_on_the_fused_path_and_equals_the_bridges(monkeypatch):
    """Retrieval's masking (`masked_answers`: one prefill, then every condition decodes as a batch row with its
    own heads masked from the answer on, uniform attention and zero ablation) on the fused path == the
    bridge's answers on the planted retrieval head; masking it uniformly breaks the answer."""
    from analyses import retrieval
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    sample = retrieval_samples(model)[0]
    others = [h for h in model.all_heads() if h != RETRIEVAL_HEAD][:2]
    conditions = retrieval.masking_conditions(model, [RETRIEVAL_HEAD, *others], [1], ("uniform", "zero"), 2, 0)
    with _bridge_only(model):
        expected = retrieval.masked_answers(model, sample, conditions, 6, batch=4)
    with _entries(monkeypatch) as entered:
        got = retrieval.masked_answers(model, sample, conditions, 6, batch=4)
    assert len(entered) >= 3 and got == expected
    top = [i for i, c in enumerate(conditions) if c["selection"] == "top" and c["kind"] == "uniform"]
    assert got[top[0]] != got[0]  # the planted head masked: the needle is not copied


def test_duo_niah_with_streaming_heads_runs_on_the_fused_path_and_equals_the_bridges(monkeypatch):
    """Duo's NIAH (`niah_accuracy`: greedy generation inside a block of streaming masks, sink + recent window
    as an SDPA mask; both regimes) on the planted retrieval model == the bridge's recall; streaming the planted
    head from every position on loses the needle."""
    from analyses import duo
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    samples = retrieval_samples(model, lengths=(60,))[:2]
    for regime in ("decode-only", "all-positions"):
        config = duo.DuoConfig(sink=1, recent=3, regime=regime, max_new_tokens=6)
        heads = [RETRIEVAL_HEAD, Head(0, 1)]
        with _bridge_only(model):
            expected = duo.niah_accuracy(model, samples, heads, config)
        with _entries(monkeypatch) as entered:
            got = duo.niah_accuracy(model, samples, heads, config)
        assert len(entered) == len(samples) and got == expected
    full = duo.niah_accuracy(model, samples, [], config)
    assert min(full) > max(got)  # all-positions streaming of the planted head loses the needle
