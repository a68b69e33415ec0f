"""DuoAttention gates: planted long-range head keeps its gate, deployment rule, memory, real-model run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from analyses import duo
from analyses.planted import duo_model as planted_model
from analyses.planted import duo_samples as planted_samples
from probe.heads import Head
from probe.interventions import intervene, streaming_attention

def test_planted_long_range_head_keeps_its_gate_and_the_others_close():
    model = planted_model()
    config = duo.DuoConfig(sink=1, recent=4, steps=120, lr=0.05, reg_weight=0.05, max_seconds=120)
    training = duo.train_gates(model, config, samples=planted_samples(model))
    gates = training.gates[0]
    assert gates[0] > 0.8, gates
    assert (gates[1:] < 0.1).all(), gates
    assert training.losses[-1] < training.losses[0]
    retrieval = duo.binarise(training.gates, 0.25)
    assert retrieval.tolist() == [[True, False, False, False]]
    assert duo.streaming_heads(model, retrieval) == [Head(0, 1), Head(0, 2), Head(0, 3)]


def test_gate_blend_at_one_is_full_attention_and_at_zero_is_streaming():
    model = planted_model()
    ids = planted_samples(model, 1)[0].ids
    full = duo.final_states(model, ids)
    ones = duo.final_states(model, ids, duo.gate_hooks(model, torch.ones(1, 4), sink=1, recent=4))
    torch.testing.assert_close(ones, full)
    zeros = duo.final_states(model, ids, duo.gate_hooks(model, torch.zeros(1, 4), sink=1, recent=4))
    with intervene(model, streaming_attention(model.all_heads(), sink=1, recent=4)):
        streaming = duo.final_states(model, ids)
    torch.testing.assert_close(zeros, streaming)
    assert (zeros - full).abs().max() > 1e-2


def test_binarise_meets_the_ratio_and_memory_accounting():
    gates = torch.tensor([[0.9, 0.1, 0.5], [0.5, 0.5, 0.2]])
    keep = duo.binarise(gates, 0.5)
    assert int(keep.sum()) == 3 and keep[0, 0] and not keep[0, 1]
    model = planted_model()
    memory = duo.kv_cache_bytes(model, torch.tensor([[True, False, False, False]]), context=1000, sink=1, recent=4)
    assert memory["full_bytes"] == 4 * 1000 * 2 * 8 * 4
    assert memory["duo_bytes"] == (1000 + 3 * 5) * 2 * 8 * 4
    assert memory["saving"] == pytest.approx(1 - 1015 / 4000)


def test_spearman_and_bad_config():
    assert duo.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert duo.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    with pytest.raises(duo.DuoError, match="regime"):
        duo.DuoConfig(regime="sometimes").validate()
    with pytest.raises(duo.DuoError, match="retrieval_fraction"):
        duo.DuoConfig(retrieval_fraction=1.0).validate()


@pytest.mark.slow
@pytest.mark.embedded
def test_learned_streaming_choice_distorts_smollm2_less_than_random_choices(smollm2):
    """Causal check on the real model: streaming the half of the KV heads with the lowest learned gates
    changes the final states on a held-out passkey prompt less than streaming as many random KV heads."""
    import random

    from analyses.data.haystack import haystack_sentences

    config = duo.DuoConfig(context_length=256, n_passkeys=2, steps=12, max_seconds=600)
    training = duo.train_gates(smollm2, config)
    sample = duo.passkey_sample(smollm2, config, random.Random(1234), haystack_sentences())
    clean = duo.final_states(smollm2, sample.ids)[sample.loss_positions]

    def distortion(retrieval: torch.Tensor) -> float:
        heads = duo.streaming_heads(smollm2, retrieval)
        with intervene(smollm2, [streaming_attention(heads, config.sink, config.recent)]):
            streamed = duo.final_states(smollm2, sample.ids)[sample.loss_positions]
        return float((streamed - clean).pow(2).mean())

    learned = distortion(duo.binarise(training.gates, 0.5))
    generator = torch.Generator().manual_seed(0)
    random_choices = [distortion(duo.binarise(torch.rand(training.gates.shape, generator=generator), 0.5))
                      for _ in range(3)]
    print(f"final-state MSE: learned choice {learned:.5f}, random choices {random_choices}")
    assert learned < min(random_choices), (learned, random_choices)


def test_recomputing_layers_in_backward_gives_the_same_gate_gradients(tiny_gqa):
    """Duo trains through every layer's attention; recomputing each layer in the backward (the
    memory bound) must give exactly the gradients of plain autograd, and must really recompute
    (the hooks fire again in the backward) or it saves nothing."""
    model = tiny_gqa
    ids = torch.randint(4, model.d_vocab, (1, 40), generator=torch.Generator().manual_seed(0))

    def gate_gradient(recompute: bool) -> tuple[torch.Tensor, int]:
        gates = torch.nn.Parameter(torch.full((model.n_layers, model.n_kv_heads), 0.5))
        calls = {"n": 0}
        captured = {}

        def count(value, hook):
            calls["n"] += 1
            return value

        def grab(value, hook):
            captured["h"] = value
            return value

        hooks = duo.gate_hooks(model, gates, sink=2, recent=4) + [("blocks.0.attn.hook_pattern", count),
                                                                  ("ln_final.hook_normalized", grab)]
        context = model.recompute_layers_in_backward() if recompute else contextlib.nullcontext()
        with context, model.hooks(hooks) as bridge:
            bridge(ids, use_cache=False)
            captured["h"][0, -8:].pow(2).sum().backward()
        return gates.grad.clone(), calls["n"]

    plain, plain_calls = gate_gradient(False)
    recomputed, recomputed_calls = gate_gradient(True)
    assert plain.abs().max() > 1e-4
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)
    assert (plain_calls, recomputed_calls) == (1, 2)
    assert not model.hf_model.training


def test_duo_reads_the_model_through_the_architecture_layer_only():
    """No Hugging Face attribute (nor the bridge's raw object) is named in analyses/duo.py: the GQA map
    comes from probe.architecture, forwards from LoadedModel (which hold its lock)."""
    import re
    from pathlib import Path

    source = Path(duo.__file__).read_text()
    names = ["hf_model", ".bridge", "input_layernorm", "post_attention_layernorm", "self_attn", "c_attn", "q_proj",
             "k_proj", "v_proj", "o_proj", "lm_head", "get_output_embeddings", "model.layers", "embed_tokens",
             "group_size", "query_heads_of"]
    found = [n for n in names if re.search(re.escape(n) + r"\b", source)]
    assert not found, found


def test_duo_gqa_maps_follow_the_architecture_layer(tiny_gqa):
    """Streaming heads, per-group maxima and the per-query gate map use the layer's query -> KV map."""
    from probe.architecture import architecture

    model = tiny_gqa
    kv_of = architecture(model).kv_of
    retrieval = torch.zeros(model.n_layers, model.n_kv_heads, dtype=torch.bool)
    retrieval[0, 0] = True
    heads = duo.streaming_heads(model, retrieval)
    assert heads == [Head(l, h) for l in range(model.n_layers) for g in range(model.n_kv_heads)
                     if not retrieval[l, g] for h in range(model.n_heads) if kv_of(h) == g]
    assert Head(0, 0) not in heads and len(heads) == model.n_layers * model.n_heads - model.n_heads // model.n_kv_heads
    scores = torch.arange(model.n_layers * model.n_heads, dtype=torch.float64).view(model.n_layers, model.n_heads)
    expected = torch.tensor([[max(float(scores[l, h]) for h in range(model.n_heads) if kv_of(h) == g)
                              for g in range(model.n_kv_heads)] for l in range(model.n_layers)], dtype=torch.float64)
    assert torch.equal(duo.group_max(model, scores), expected)
