"""DuoAttention gates: planted long-range head keeps its gate, deployment rule, memory, real-model run."""

from __future__ import annotations

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
