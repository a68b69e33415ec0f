"""DuoAttention gates: planted long-range head keeps its gate, deployment rule, memory, real-model run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from analyses import duo
from analyses.duo.gates import distillation_loss, teacher_blend, teacher_run
from analyses.duo.niah import group_max, niah_runs, spearman
from analyses.duo.passkeys import passkey_sample
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
    full = duo.distillation_states(model, ids)
    ones = duo.distillation_states(model, ids, duo.gate_hooks(model, torch.ones(1, 4), sink=1, recent=4))
    torch.testing.assert_close(ones, full)
    zeros = duo.distillation_states(model, ids, duo.gate_hooks(model, torch.zeros(1, 4), sink=1, recent=4))
    with intervene(model, streaming_attention(model.all_heads(), sink=1, recent=4)):
        streaming = duo.distillation_states(model, ids)
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
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
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
    sample = passkey_sample(smollm2, config, random.Random(1234), haystack_sentences())
    clean = duo.distillation_states(smollm2, sample.ids)[sample.loss_positions]

    def distortion(retrieval: torch.Tensor) -> float:
        heads = duo.streaming_heads(smollm2, retrieval)
        with intervene(smollm2, [streaming_attention(heads, config.sink, config.recent)]):
            streamed = duo.distillation_states(smollm2, sample.ids)[sample.loss_positions]
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
    """No Hugging Face attribute (nor the bridge's raw object) is named in the analyses/duo package: the
    GQA map comes from probe.architecture, forwards from LoadedModel (which hold its lock)."""
    import re
    from pathlib import Path

    source = "\n".join(path.read_text() for path in sorted(Path(duo.__file__).parent.glob("*.py")))
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
    assert torch.equal(group_max(model, scores), expected)


# ---- the authors' objective: teacher full branch, final norm with its weight, fresh samples ----

def _random_sample(model, length: int = 40, n_loss: int = 8, seed: int = 0) -> duo.PasskeySample:
    ids = torch.randint(4, model.d_vocab, (1, length), generator=torch.Generator().manual_seed(seed))
    return duo.PasskeySample(ids, torch.arange(length - n_loss, length))


@pytest.mark.parametrize("recompute", [False, True])
def test_teacher_branch_at_gates_one_is_exact_and_only_the_l1_term_has_a_gradient(tiny_gqa, recompute):
    """With the full branch reading the teacher's z, gates of 1 everywhere make the student the teacher
    bit for bit: the distillation term is exactly 0, so its gradient vanishes and each gate's gradient
    is the L1 term's by hand, λ / (n_layers · n_kv_heads)."""
    model = tiny_gqa
    config = duo.DuoConfig(sink=2, recent=4, reg_weight=0.05)
    sample = _random_sample(model)
    teacher = teacher_run(model, sample)
    gates = torch.nn.Parameter(torch.ones(model.n_layers, model.n_kv_heads))
    context = model.recompute_layers_in_backward() if recompute else contextlib.nullcontext()
    with context:
        distill, loss = distillation_loss(model, gates, sample, teacher, config)
    assert float(distill) == 0.0
    assert float(loss) == pytest.approx(0.05)
    assert torch.equal(gates.grad, torch.full_like(gates, 0.05 / gates.numel()))


def test_teacher_branch_reads_the_teachers_states_not_the_drifted_student(tiny_gqa):
    """Layer 0 fully streaming (the student's residual drifts), layer 1 at gate 1: with the authors'
    teacher branch layer 1's attention output is the teacher's exactly; the "student" option instead
    runs full attention on the drifted states. (On the bridge throughout: `hook_attn_out`, read here,
    does not fire on the fused path, and bit equality needs one kernel for teacher and student.)"""
    model = tiny_gqa
    model.fused_routing = False
    assert model.n_layers >= 2
    sample = _random_sample(model, length=48)
    gates = torch.ones(model.n_layers, model.n_kv_heads)
    gates[0] = 0.0
    seen: dict[str, torch.Tensor] = {}

    def grab(value, hook):
        seen["out"] = value.detach().clone()
        return value

    teacher = teacher_run(model, sample)
    duo.distillation_states(model, sample.ids, [("blocks.1.attn.hook_out", grab)])
    clean = seen.pop("out")
    hooks, interventions = teacher_blend(model, gates, sink=1, recent=3, teacher_z=teacher.z)
    with intervene(model, interventions):
        duo.distillation_states(model, sample.ids, hooks + [("blocks.1.attn.hook_out", grab)])
    torch.testing.assert_close(seen.pop("out"), clean, rtol=0, atol=0)
    duo.distillation_states(model, sample.ids, duo.gate_hooks(model, gates, sink=1, recent=3) + [("blocks.1.attn.hook_out", grab)])
    assert (seen.pop("out") - clean).abs().max() > 1e-3
    # the training loss is that student's: layer 0 streamed by the core intervention, layer 1's z the
    # teacher's (written in by hand), its final states against the teacher's
    layer0 = [Head(0, h) for h in range(model.n_heads)]
    with intervene(model, streaming_attention(layer0, sink=1, recent=3)):
        by_hand = duo.distillation_states(model, sample.ids, [("blocks.1.attn.hook_z", lambda z, hook: teacher.z[1])])
    expected = (by_hand[sample.loss_positions] - teacher.states).pow(2).mean()
    config = duo.DuoConfig(sink=1, recent=3)
    distill, _ = distillation_loss(model, gates, sample, teacher, config)
    assert float(expected) > 1e-6
    assert float(distill) == pytest.approx(float(expected), rel=1e-5)
    student = duo.DuoConfig(sink=1, recent=3, full_branch="student")
    assert float(distillation_loss(model, gates, sample, teacher, student)[0]) != pytest.approx(float(expected), rel=1e-2)


def test_teacher_branch_gradient_is_the_derivative_of_its_loss(tiny_gqa):
    """Autograd's gate gradient (through the recomputed layers) equals a central finite difference of
    the same loss, for a gate of each layer, at random gates in (0, 1)."""
    model = tiny_gqa
    model.hf_model.double()
    try:
        config = duo.DuoConfig(sink=1, recent=3, reg_weight=0.05)
        sample = _random_sample(model, length=32)
        teacher = teacher_run(model, sample)
        base = torch.rand(model.n_layers, model.n_kv_heads, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64) * 0.6 + 0.2
        gates = torch.nn.Parameter(base.clone())
        with model.recompute_layers_in_backward():
            distillation_loss(model, gates, sample, teacher, config)
        assert gates.grad.abs().max() > 1e-4
        eps = 1e-3  # the bridge keeps some float32 steps: smaller steps are rounding noise
        for layer in range(model.n_layers):
            values = []
            for sign in (1, -1):
                shifted = base.clone()
                shifted[layer, 0] += sign * eps
                values.append(float(distillation_loss(model, shifted, sample, teacher, config)[1]))
            numeric = (values[0] - values[1]) / (2 * eps)
            assert float(gates.grad[layer, 0]) == pytest.approx(numeric, rel=5e-4, abs=1e-7)
    finally:
        model.hf_model.float()


def test_distillation_target_includes_the_final_norm_weight(tiny_gqa):
    """The target is the final norm's output with its weight (probe.readout.apply_final_norm): scaling the
    weight by 3 scales the teacher and student states by 3 and the distillation term by 9 (the
    pre-weight `hook_normalized` would leave it unchanged)."""
    from probe.architecture import architecture

    model = tiny_gqa
    config = duo.DuoConfig(sink=1, recent=3)
    sample = _random_sample(model)
    gates = torch.full((model.n_layers, model.n_kv_heads), 0.3)

    def distill() -> float:
        return float(distillation_loss(model, gates, sample, teacher_run(model, sample), config)[0])

    before = distill()
    weight = architecture(model).final_norm.module.weight
    with torch.no_grad():
        weight.mul_(3.0)
    try:
        after = distill()
        states = duo.distillation_states(model, sample.ids)
    finally:
        with torch.no_grad():
            weight.div_(3.0)
    assert before > 1e-6
    assert after == pytest.approx(9 * before, rel=1e-5)
    torch.testing.assert_close(states, 3 * duo.distillation_states(model, sample.ids), rtol=1e-5, atol=1e-6)


def test_a_fresh_seeded_passkey_sample_at_every_step(tiny_gqa):
    """Consecutive steps train on different synthetic prompts; the same seed gives the same prompts
    (and gates), another seed other prompts; given samples are cycled."""
    import random

    model = tiny_gqa
    words = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(3)) + "." for _ in range(2100)]
    config = duo.DuoConfig(context_length=24, n_passkeys=2, passkey_words=2, sink=1, recent=4, steps=4)
    first = duo.train_gates(model, config, sentences=sentences)
    assert len(set(first.sample_digests)) == 4, first.sample_digests
    again = duo.train_gates(model, config, sentences=sentences)
    assert again.sample_digests == first.sample_digests and torch.equal(again.gates, first.gates)
    other = duo.train_gates(model, duo.DuoConfig(**{**config.__dict__, "seed": 1}), sentences=sentences)
    assert not set(other.sample_digests) & set(first.sample_digests)
    given = [_random_sample(model, seed=s) for s in range(2)]
    cycled = duo.train_gates(model, config, samples=given)
    assert cycled.sample_digests[:2] == cycled.sample_digests[2:] and cycled.sample_digests[0] != cycled.sample_digests[1]


# ---- docs numbers against the committed result file ---------------------------------------------

RESULT = "docs/results/duo_smollm2_quick.json"
# (text in docs/duo.md, key path into the result file, how the doc renders it)
DOC_NUMBERS = [
    ("**10 of 20 steps**", "result.steps_done", lambda v: f"**{v} of 20 steps**"),
    ("loss\n  0.0500 → 0.0449", "result.losses", lambda v: f"loss\n  {v[0]:.4f} → {v[-1]:.4f}"),
    ("distillation 0 → 0.0013", "result.distill", lambda v: f"distillation {v[0]:.0f} → {v[-1]:.4f}"),
    ("[0.83, 1.00], mean 0.859", "result.gates", lambda v: "[{:.2f}, {:.2f}], mean {:.3f}".format(
        min(map(min, v)), max(map(max, v)), sum(map(sum, v)) / sum(map(len, v)))),
    ("full attention **0.451**, Duo **0.473**", "result.niah",
     lambda v: f"full attention **{v['full_mean']:.3f}**, Duo **{v['duo_mean']:.3f}**"),
    ("**0.270 ± 0.077** (4 draws: 0.383, 0.223, 0.258, 0.216", "result.niah",
     lambda v: f"**{v['random_mean']:.3f} ± {v['random_std']:.3f}** ({len(v['random_means'])} draws: "
               + ", ".join(f"{m:.3f}" for m in v["random_means"])),
    ("per KV group by max) **0.655**", "result.retrieval_spearman", lambda v: f"per KV group by max) **{v:.3f}**"),
    ("profiling baseline) 0.144", "result.profiling_spearman", lambda v: f"profiling baseline) {v:.3f}"),
    ("512 tokens 22.5 → 13.0 MiB (42 % saved)", "result.memory.0",
     lambda v: f"{v['context']} tokens {v['full_bytes'] / 2**20:.1f} → {v['duo_bytes'] / 2**20:.1f} MiB ({v['saving']:.0%} saved)"
     .replace("%", " %")),
    ("8,192 tokens 360 → 182 MiB (50 %)", "result.memory.2",
     lambda v: f"{v['context']:,} tokens {v['full_bytes'] / 2**20:.0f} → {v['duo_bytes'] / 2**20:.0f} MiB ({v['saving']:.0%})"
     .replace("%", " %")),
]


def _at(document, path: str):
    for part in path.split("."):
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


@pytest.mark.parametrize("text,path,render", DOC_NUMBERS, ids=[t[:24] for t, _, _ in DOC_NUMBERS])
def test_docs_numbers_come_from_the_committed_result(text, path, render):
    """Each measured SmolLM2 number of docs/duo.md is rendered from the committed result at its key path;
    the result was made by the authors' objective (version 2, teacher branch) with the config's settings."""
    import json
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[3]
    document = json.loads((root / RESULT).read_text())
    assert render(_at(document, path)) == text
    assert text in (root / "docs" / "duo.md").read_text()
    assert document["version"] == duo.VERSION and document["config"]["full_branch"] == "teacher"
    settings = yaml.safe_load((root / "configs" / "duo_smollm2_quick.yaml").read_text())["duo"]
    assert {k: document["config"][k] for k in settings} == settings


@pytest.mark.parametrize("name", ["tiny_gqa", "tiny_gpt2"])
def test_training_takes_the_fused_path_where_it_can_and_equals_the_bridge(name, request, monkeypatch):
    """Teacher and student forwards (and the recomputed layers of the backward) run on the fused path
    (SDPA with the streaming mask, z blended at the output projection's input) where the family allows it,
    and three training steps give the bridge's gates and losses. GPT-2's HF attention never calls the
    hook_z its blend needs: it stays on the bridge."""
    import probe.fused

    model = request.getfixturevalue(name)
    entries = {"n": 0}
    original = probe.fused.fused

    @contextlib.contextmanager
    def counted(*args, **kwargs):
        entries["n"] += 1
        with original(*args, **kwargs) as state:
            yield state

    monkeypatch.setattr(probe.fused, "fused", counted)
    config = duo.DuoConfig(sink=2, recent=4, steps=3, lr=0.05, reg_weight=0.05)
    samples = [_random_sample(model, length=40, seed=seed) for seed in range(3)]
    fused = duo.train_gates(model, config, samples=samples)
    fused_entries = entries["n"]
    model.fused_routing = False
    bridge = duo.train_gates(model, config, samples=samples)
    model.fused_routing = True
    assert entries["n"] == fused_entries  # nothing fused with the routing off
    if name == "tiny_gpt2":
        assert fused_entries == 0
    else:
        assert fused_entries == 2 * config.steps  # teacher + student per step
    assert (fused.gates - 1).abs().max() > 1e-3  # the gates moved
    torch.testing.assert_close(fused.gates, bridge.gates, rtol=0, atol=1e-5)
    assert fused.distill == pytest.approx(bridge.distill, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("regime", ["decode-only", "all-positions"])
def test_niah_runs_batch_the_head_sets_and_equal_each_set_alone(regime):
    """`niah_runs` (decode-only: one prefill per sample, every head set decoded in one batch) == one
    `niah_accuracy` per set, on the planted retrieval model whose needle the planted head copies; the sets'
    recalls differ (streaming the planted head from every position on loses the needle)."""
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    samples = retrieval_samples(model, lengths=(60,))[:3]
    config = duo.DuoConfig(sink=1, recent=3, regime=regime, max_new_tokens=6)
    head_sets = [[], [RETRIEVAL_HEAD], [Head(0, 1)], [RETRIEVAL_HEAD, Head(0, 1)]]
    expected = [duo.niah_accuracy(model, samples, heads, config) for heads in head_sets]
    assert niah_runs(model, samples, head_sets, config) == expected
    if regime == "all-positions":
        assert min(expected[0]) > max(expected[1])
