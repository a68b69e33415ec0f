"""Planting through the architecture layer (probe/plant.py) on every family, and planted mechanisms
found by their analyzers on families of different shapes.

(a) Writes, on the 12 random families of tests/support/families.py (each loaded from its folder the user's way,
    a private copy: the writes must not touch the shared matrix models): per-head W_Q/W_K/W_V/W_O and
    MLP weights read back exactly through the bridge's own split (`architecture(model, refresh=True)`,
    `bridge.W_in`), the other heads untouched; the forward sees each write as predicted by an
    intervention run before it (zero W_O = zero-ablating the head, zero W_V = zero-ablating the heads of
    that KV head, zero W_Q / W_K = uniform attention), and a written MLP computes its formula.
(b) Mechanisms: retrieval, successor, safety and factual planted in Llama (GQA), GPT-NeoX (parallel block,
    partial rotary, packed interleaved qkv, LayerNorm), GPT-2 (learned positions, Conv1D packed qkv),
    Qwen3 (QK-norm) and Gemma 3 (QK-norm, norms before and after each sublayer, 1 + w, embedding
    scale): the analyzer's top head is the planted one, and moving the plant to another head moves the
    finding (retrieval: no copy at all without the copy gain); the factual in-context and memory heads
    get their signs from factual's attribution, and the in-context one loses it without its gain.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_folder
from matrix import record, record_effect
from transformers.activations import ACT2FN

from analyses import planted, safety, successor
from analyses.retrieval import fast_sample
from probe import plant
from probe.architecture import architecture
from probe.heads import Head
from probe.interventions import intervene, uniform_attention, zero_ablation
from probe.models import LoadedModel, load_model

TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
MECHANISM_FAMILIES = ["llama", "gpt_neox", "gpt2", "qwen3", "gemma3"]
FAST = successor.SuccessorConfig(run_probe=False, run_arithmetic=False, run_causal=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plant-families")


def _own_copy(name: str, root: Path) -> LoadedModel:
    return load_model(f"hf:{build_folder(name, root)}", device="cpu")


def _logits(model: LoadedModel, ids: torch.Tensor, interventions=None) -> torch.Tensor:
    if interventions is None:
        return model.logits(ids).float()
    with intervene(model, interventions):
        return model.logits(ids).float()


# ---- (a) writes on every family --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_head_writes_read_back_through_the_bridge_and_the_forward_sees_them(name, root):
    model = _own_copy(name, root)
    arch = architecture(model)
    ids = model.encode(TEXT)
    last = model.n_heads - 1
    loaded_as = model.fingerprint
    whole_qk_norm = arch.qk_norm(0) == "whole"  # OLMo-2: zeroing one head's q re-scales the others'
    forward = 0.0

    # zero W_O[L0H0] == zero-ablating L0H0; zero W_Q[L0H1] == uniform attention on L0H1
    expected = _logits(model, ids, zero_ablation([Head(0, 0)]))
    plant.set_o(model, 0, 0, torch.zeros(model.d_head, model.d_model))
    forward = max(forward, float((_logits(model, ids) - expected).abs().max()))
    if not whole_qk_norm:
        expected = _logits(model, ids, uniform_attention([Head(0, 1)]))
        plant.set_q(model, 0, 1, torch.zeros(model.d_model, model.d_head))
        forward = max(forward, float((_logits(model, ids) - expected).abs().max()))
        # zero W_K of the last head's KV head == uniform attention on every query head reading it
        kv = arch.kv_of(last)
        expected = _logits(model, ids, uniform_attention([Head(1, h) for h in model.query_heads_of(kv)]))
        plant.set_k(model, 1, kv, torch.zeros(model.d_model, model.d_head))
        forward = max(forward, float((_logits(model, ids) - expected).abs().max()))
    kv = arch.kv_of(last)  # zero W_V (and b_V) == zero-ablating the heads of that KV head
    expected = _logits(model, ids, zero_ablation([Head(2, h) for h in model.query_heads_of(kv)]))
    plant.set_v(model, 2, kv, torch.zeros(model.d_model, model.d_head))
    forward = max(forward, float((_logits(model, ids) - expected).abs().max()))
    assert record(name, "plant forward", forward) <= 1e-4

    # random per-head writes read back through the bridge's split; nothing else moves
    before = {n: getattr(architecture(model, refresh=True), n).clone() for n in ("W_Q", "W_K", "W_V", "W_O")}
    g = torch.Generator().manual_seed(0)
    layer, head, kv = 1, last, arch.kv_of(last)
    writes = {"W_Q": (head, torch.randn(model.d_model, model.d_head, generator=g)),
              "W_K": (kv, torch.randn(model.d_model, model.d_head, generator=g)),
              "W_V": (kv, torch.randn(model.d_model, model.d_head, generator=g)),
              "W_O": (head, torch.randn(model.d_head, model.d_model, generator=g))}
    plant.set_head_qk(model, layer, head, writes["W_Q"][1], writes["W_K"][1])
    plant.set_head_ov(model, layer, head, writes["W_V"][1], writes["W_O"][1])
    after = architecture(model, refresh=True)
    deviation = 0.0
    for key, (index, value) in writes.items():
        want = before[key].clone()
        want[layer, index] = value
        deviation = max(deviation, float((getattr(after, key) - want).abs().max()))
    assert record(name, "plant read-back", deviation) == 0.0
    assert not torch.equal(_logits(model, ids), expected)  # and the forward changed with them
    assert model.fingerprint != loaded_as  # cached results of the loaded weights are not offered


@pytest.mark.parametrize("name", list(FAMILIES))
def test_norm_writes_are_the_effective_weights_the_layer_reads(name, root):
    """Gemma stores w and applies 1 + w: the written effective weight is what the module applies."""
    model = _own_copy(name, root)
    g = torch.Generator().manual_seed(3)
    weight = 1.0 + 0.5 * torch.rand(model.d_model, generator=g)
    plant.set_norm(model, "final", None, weight)
    deviation = float((architecture(model).final_norm.weight.float() - weight).abs().max())
    plant.reset_norms(model)
    arch = architecture(model)
    norms = [arch.final_norm] + [n for layer in range(model.n_layers)
                                 for n in (arch.norm(k, layer) for k in ("ln1", "ln2", "ln1_post", "ln2_post"))
                                 if n is not None]
    deviation = max(deviation, *(float((n.weight.float() - 1.0).abs().max()) for n in norms))
    assert record(name, "plant norm weight", deviation) <= 1e-6


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mlp_writes_read_back_and_compute_their_formula(name, root):
    model = _own_copy(name, root)
    arch = architecture(model)
    x = torch.randn(5, model.d_model, generator=torch.Generator().manual_seed(1))
    plant.zero_mlp(model, 1)
    assert float(architecture(model).mlp_block_output(1, x).abs().max()) == 0.0
    if arch.mlp(0).kind == "moe":
        with pytest.raises(plant.PlantError, match="MoE"):
            plant.set_mlp(model, 0, torch.zeros(1), torch.zeros(1))
        with pytest.raises(plant.PlantError, match="no dense output projection"):
            plant.zero_mlp(model, 2, out_only=True)
        return
    assert float(architecture(model).mlp_block_output(2, x).abs().max()) > 0.0
    plant.zero_mlp(model, 2, out_only=True)
    assert float(architecture(model).mlp_block_output(2, x).abs().max()) == 0.0
    d_mlp = model.bridge.W_in.shape[-1]
    g = torch.Generator().manual_seed(2)
    W_in, W_out = torch.randn(model.d_model, d_mlp, generator=g) / 8, torch.randn(d_mlp, model.d_model, generator=g) / 8
    gated = arch.mlp(0).kind == "gated"
    W_gate = torch.randn(model.d_model, d_mlp, generator=g) / 8 if gated else None
    plant.set_mlp(model, 0, W_in, W_out, W_gate=W_gate)
    bridge = model.bridge
    deviation = max(float((bridge.W_in[0] - W_in).abs().max()), float((bridge.W_out[0] - W_out).abs().max()),
                    float((bridge.W_gate[0] - W_gate).abs().max()) if gated else 0.0)
    assert record(name, "plant read-back", deviation) == 0.0
    act = ACT2FN[architecture(model).mlp(0).act]
    want = (act(x @ W_gate) * (x @ W_in) if gated else act(x @ W_in)) @ W_out
    with model.lock:
        got = architecture(model).mlp(0)(x)
    assert record(name, "plant forward", float((got - want).abs().max())) <= 1e-4


def test_bad_writes_are_clear_errors(root):
    model = _own_copy("llama", root)
    with pytest.raises(plant.PlantError, match="expected shape"):
        plant.set_q(model, 0, 0, torch.zeros(3, 3))
    with pytest.raises(plant.PlantError, match="out of range"):
        plant.set_k(model, 0, model.n_kv_heads, torch.zeros(model.d_model, model.d_head))
    with pytest.raises(plant.PlantError, match="no bias"):
        plant.set_v(model, 0, 0, torch.zeros(model.d_model, model.d_head), torch.ones(model.d_head))
    with pytest.raises(plant.PlantError, match="d_head is d_model / n_heads"):
        plant.new_model("gpt2", plant.Shape(10, 64, 1, 4, 4, 32, 8, 16), model.tokenizer, "bad")
    with pytest.raises(plant.PlantError, match="family"):
        plant.new_model("mamba", plant.Shape(10, 64, 1, 4, 4, 16, 8, 16), model.tokenizer, "bad")


# ---- (b) planted mechanisms on families of different shapes ---------------------------------------

def _retrieval_events(model: LoadedModel) -> tuple[torch.Tensor, list[str]]:
    samples = planted.retrieval_samples(model, lengths=(60,), depths=(0, 100))
    traces = [fast_sample(model, s, 6) for s in samples]
    spans = [s.answer_tokens[1] - s.answer_tokens[0] for s in samples]
    events = torch.stack([t.events.double() / n for t, n in zip(traces, spans)]).mean(0)
    return events, [t.response for t in traces]


def _top(scores: torch.Tensor, n_heads: int) -> tuple[Head, float, float]:
    """(best head, its score, the best other score) of a `[L, H]` score grid."""
    flat = scores.flatten().double()
    best = int(flat.argmax())
    others = flat.clone()
    others[best] = float("-inf")
    return Head(best // n_heads, best % n_heads), float(flat[best]), float(others.max())


@pytest.mark.parametrize("name", MECHANISM_FAMILIES)
def test_planted_retrieval_head_is_found_and_follows_the_plant(name):
    model = planted.retrieval_model(family=name)
    events, responses = _retrieval_events(model)
    head, score, other = _top(events, model.n_heads)
    assert all(r.startswith(planted.RETRIEVAL_NEEDLE.answer) for r in responses)
    assert head == planted.RETRIEVAL_HEAD and score > 0.9 and other <= 0.1
    assert events[planted.RETRIEVAL_DECOY.layer, planted.RETRIEVAL_DECOY.head] == 0
    record_effect(name, "planted retrieval margin", score - other)
    moved = planted.retrieval_model(family=name, head=Head(0, 1), decoy=Head(0, 0))
    events, _ = _retrieval_events(moved)
    head, score, other = _top(events, model.n_heads)
    assert head == Head(0, 1) and score > 0.9 and other <= 0.1
    silent, responses = _retrieval_events(planted.retrieval_model(copy_gain=0.0, family=name))
    assert float(silent.max()) == 0.0 and not any(r.startswith("red fox") for r in responses)


@pytest.mark.parametrize("name", MECHANISM_FAMILIES)
def test_planted_successor_head_is_found_and_follows_the_plant(name):
    result = successor.run(planted.successor_model(family=name), FAST)
    (best, score), (_, runner_up) = result.scores.top(2)
    assert best == planted.SUCCESSOR_HEAD and score == 1.0 and runner_up < 0.25
    record_effect(name, "planted successor margin", score - runner_up)
    moved = successor.run(planted.successor_model(family=name, head=Head(1, 0)), FAST)
    (best, score), (_, runner_up) = moved.scores.top(2)
    assert best == Head(1, 0) and score == 1.0 and runner_up < 0.25


@pytest.mark.parametrize("name", MECHANISM_FAMILIES)
def test_planted_safety_head_is_found_and_follows_the_plant(name):
    model = planted.safety_model(family=name)
    sorry, sure = (model.tokenizer.convert_tokens_to_ids(w) for w in ("sorry", "sure"))
    for text, harmful in ([(t, True) for t in planted.SAFETY_HARMFUL_PROMPTS]
                          + [(t, False) for t in planted.SAFETY_HARMLESS_PROMPTS]):
        logits = model.logits(model.encode(text))[0, -1]
        assert (logits[sorry] > logits[sure]) == harmful, text
    margin = 1.0
    for text in planted.SAFETY_HARMFUL_PROMPTS:
        head, score, other = _top(safety.ships_query(model, model.encode(text), "query", 1e-5), model.n_heads)
        assert head == planted.SAFETY_HEAD, text
        margin = min(margin, (score - other) / score)
    record_effect(name, "planted safety margin", margin)
    moved = planted.safety_model(family=name, head=Head(1, 0))
    for text in planted.SAFETY_HARMFUL_PROMPTS[:3]:
        head, _, _ = _top(safety.ships_query(moved, moved.encode(text), "query", 1e-5), model.n_heads)
        assert head == Head(1, 0), text


@pytest.mark.parametrize("name", MECHANISM_FAMILIES)
def test_planted_factual_heads_are_found_with_their_signs(name):
    from analyses import factual
    from analyses.data.capitals import Capital
    from analyses.data.counterfactual import build_counterfactuals
    from analyses.planted.factual import IN_CONTEXT_HEAD, MEMORY_HEAD, PLANTED_TABLE, planted_factual_model

    pool = [Capital(country, city) for country, city in PLANTED_TABLE]

    def attribution(copy_gain: float) -> tuple[torch.Tensor, float]:
        model = planted_factual_model(copy_gain=copy_gain, family=name)
        prompts = build_counterfactuals(model.tokenizer, pool, 12, seed=3).prompts
        result = factual.head_attribution(model, prompts)
        return result.mean, float((result.per_prompt.sum((1, 2)) - result.clean_diff).abs().max())

    ic, mem = (IN_CONTEXT_HEAD.layer, IN_CONTEXT_HEAD.head), (MEMORY_HEAD.layer, MEMORY_HEAD.head)
    mean, gap = attribution(3.0)
    in_context, memory = float(mean[ic]), float(mean[mem])
    others = mean.clone()
    others[ic] = others[mem] = 0.0
    assert in_context > 1.0 and memory < -1.0 and float(others.abs().max()) < 1e-6
    assert gap < 1e-4  # no MLP, no bias: the heads' direct effects add up to the logit difference
    record_effect(name, "planted factual DLA", min(in_context, -memory))
    silent, _ = attribution(0.0)  # control: without its copy gain the in-context head attributes nothing
    assert abs(float(silent[ic])) < 1e-6 and float(silent[mem]) < -1.0
