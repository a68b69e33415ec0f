"""Reduced precision: bf16/fp16 models run every analyzer, the numerically sensitive steps run in float32,
results say their device and dtype; bf16 scores agree with fp32 on the planted models
(docs/results/bf16_agreement.json from tools/scale_agreement.py, shown in docs/SCALE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analyses import factual, planted, safety
from analyses.data.capitals import Capital
from analyses.data.counterfactual import build_counterfactuals
from analyses.registry import ANALYZERS
from probe import readout
from probe.heads import Head
from probe.interventions import head_means, intervene, mean_source_prompts, zero_ablation
from probe.models import converted, facts, load_model
from tools import scale_agreement

ROOT = Path(__file__).resolve().parents[2]


def test_bf16_model_says_its_dtype_and_reads_out_in_float32():
    fp32, bf16 = load_model("tiny-llama", device="cpu"), load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert (facts(bf16)["dtype"], facts(bf16)["device"]) == ("bfloat16", "cpu")
    assert bf16.fingerprint != fp32.fingerprint  # bf16 results are never served as fp32 ones
    widened = converted(bf16, dtype="float32")  # the same (bf16-exact) values in float32: still another key
    assert widened.fingerprint != bf16.fingerprint and converted(widened, dtype="bfloat16").fingerprint == bf16.fingerprint
    assert next(bf16.hf_model.parameters()).dtype == torch.bfloat16
    ids = bf16.encode("the capital city of the country is")
    logits = bf16.logits(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), fp32.logits(ids), atol=0.05, rtol=0.05)
    normalized = readout.apply_final_norm(bf16, torch.randn(3, bf16.d_model))
    assert readout.log_probs_from_normalized(bf16, normalized).dtype == torch.float32
    assert readout.unembed(bf16, normalized).dtype == torch.float32
    means = head_means(bf16, mean_source_prompts(bf16)[:2], [Head(0, 1)])
    assert means[Head(0, 1)].dtype == torch.float32  # summed in float32, applied in the model's dtype
    with intervene(bf16, zero_ablation([Head(1, 0)])):
        assert not torch.equal(bf16.logits(ids), logits)
    fp16 = load_model("tiny-gpt2", device="cpu", dtype="float16")
    assert torch.isfinite(fp16.logits(ids).float()).all() and facts(fp16)["dtype"] == "float16"


def test_bf16_copy_of_a_planted_model_keeps_the_safety_head_and_its_ranking():
    model = planted.safety_model()
    bf16 = converted(model, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and model.dtype == torch.float32  # the original is untouched
    for text in planted.SAFETY_HARMFUL_PROMPTS[:3]:
        a = safety.ships_query(model, model.encode(text), "query", 0.0)
        b = safety.ships_query(bf16, bf16.encode(text), "query", 0.0)
        found = scale_agreement.agreement(a, b, planted.SAFETY_HEAD)
        assert found["planted_rank"] == found["planted_rank_reference"] == 1.0, text
        assert found["spearman_resolved"] >= 0.95, text


def test_bf16_factual_attribution_keeps_the_planted_heads_and_their_signs():
    pool = [Capital(country, city) for country, city in planted.FACTUAL_TABLE]
    model = planted.factual_model()
    bf16 = converted(model, dtype="bfloat16")
    prompts = build_counterfactuals(model.tokenizer, pool, 8, seed=3).prompts
    a, b = factual.head_attribution(model, prompts).mean, factual.head_attribution(bf16, prompts).mean
    ic, mem = planted.FACTUAL_IN_CONTEXT_HEAD, planted.FACTUAL_MEMORY_HEAD
    assert int(b.argmax()) == ic.layer * model.n_heads + ic.head and int(b.argmin()) == mem.layer * model.n_heads + mem.head
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


def test_spearman_and_ranks_of_the_agreement_tool():
    assert scale_agreement.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert scale_agreement.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert scale_agreement._ranks([5.0, 1.0, 5.0]) == [1.5, 3.0, 1.5]
    scores = torch.tensor([[0.1, 0.9], [0.3, 0.2]])
    assert scale_agreement.planted_rank(scores, Head(0, 1)) == 1.0
    assert scale_agreement.planted_rank(scores, Head(1, 1)) == 3.0
    tiny = torch.tensor([[1e-11, 3e-12], [38.5, 4e-12]])  # rounding-level scores tie at 0
    noisy = torch.tensor([[0.0, 9e-12], [38.6, 1e-13]])
    found = scale_agreement.agreement(tiny, noisy, Head(1, 0))
    assert found["spearman"] < 0.95 and found["spearman_resolved"] == 1.0 and found["heads_below_resolution"] == 3



def test_bf16_agreement_file_covers_every_analyzer_and_the_doc_shows_it():
    data = json.loads((ROOT / "docs/results/bf16_agreement.json").read_text())
    assert data["command"] == scale_agreement.COMMAND
    doc = (ROOT / "docs/SCALE.md").read_text()
    rows = scale_agreement.doc_rows(doc, "## Reduced precision")
    assert set(data["analyzers"]) == set(ANALYZERS) == set(rows)
    for name, entry in data["analyzers"].items():
        assert entry["planted_rank"] == entry["planted_rank_reference"] == 1.0, name
        assert entry["spearman_resolved"] >= 0.95, name
        assert rows[name][1:6] == [f"{entry['max_abs_diff']:.3g}", f"{entry['max_abs_reference']:.3g}",
                                   f"{entry['spearman']:.3f}", f"{entry['spearman_resolved']:.3f}",
                                   f"{entry['planted_rank_reference']:g} / {entry['planted_rank']:g}"], name
    half = scale_agreement.doc_rows(doc, "\nfloat16 vs float32 on the planted models")  # not the "bfloat16 vs" line
    assert set(data["float16"]) == set(ANALYZERS) == set(half)
    for name, entry in data["float16"].items():
        assert entry["planted_rank"] == entry["planted_rank_reference"] == 1.0, name
        assert entry["spearman_resolved"] >= 0.95, name
        assert half[name][1:5] == [f"{entry['max_abs_diff']:.3g}", f"{entry['spearman']:.3f}",
                                   f"{entry['spearman_resolved']:.3f}",
                                   f"{entry['planted_rank_reference']:g} / {entry['planted_rank']:g}"], name
    assert scale_agreement.COMMAND in doc


def test_duo_gates_at_zero_are_streaming_attention_exactly_in_bf16():
    """Duo's blended pattern takes its streaming softmax in float32, as the model's own eager attention does:
    with every gate at 0 the bf16 model's final states are the streaming intervention's, bit for bit."""
    from analyses import duo
    from probe.interventions import streaming_attention

    model = converted(planted.duo_model(), dtype="bfloat16")
    model.fused_routing = False  # both on the bridge's eager attention (SDPA's bf16 rounding differs)
    ids = planted.duo_samples(model, 1)[0].ids
    zeros = duo.distillation_states(model, ids, duo.gate_hooks(model, torch.zeros(1, 4), sink=1, recent=4))
    with intervene(model, streaming_attention(model.all_heads(), sink=1, recent=4)):
        streaming = duo.distillation_states(model, ids)
    assert torch.equal(zeros, streaming)
    assert not torch.equal(zeros, duo.distillation_states(model, ids))
