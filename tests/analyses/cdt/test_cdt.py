"""CD-T: exact decomposition on every supported architecture, the rules' invariants, a planted circuit,
agreement with path patching, bad input, and a causal check on SmolLM2."""

from __future__ import annotations

import json
import types

import pytest
import torch

import analyses.cdt as cdt
from analyses.cdt import circuits, fast, patching, rules, tasks
from analyses.cdt.arch import CDTError, UnsupportedArchitectureError, read_weights
from analyses.cdt.engine import Engine, RuleOptions
from analyses.planted import INDUCTION_HEADS as PLANTED
from analyses.planted import induction_batch
from analyses.planted import induction_model as planted_induction_model
from probe.heads import Head

@pytest.fixture(scope="module")
def planted():
    """The planted previous-token → induction model (built once: ~2 s)."""
    return planted_induction_model()


TINY_PROMPT = "the capital of mary is the book of john and the key"
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"

# hooks whose value the engine's β + γ must reproduce (names as in the bridge)
CHECKED = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
           "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
           "ln1.hook_out", "ln2.hook_out", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out")


def _assert_exact(model, text: str, dtype: str = "float32", options: RuleOptions | None = None) -> int:
    """β + γ equals the bridge's activation at every checked hook and the logits (1e-4 relative)."""
    ids = model.encode(text)
    logits, cache = model.bridge.run_with_cache(ids)
    engine = Engine(model, dtype, options)
    relevant = torch.zeros(ids.shape, dtype=torch.bool)
    relevant[0, 1:3] = True  # some words relevant, so β and γ are both non-trivial
    (beta_logits, gamma_logits), record = engine.decompose(ids, relevant_positions=relevant, record=True)
    assert beta_logits.abs().max() > 1e-3  # the source does reach the output
    compared = 0
    for name, (beta, gamma) in record.items():
        if name not in cache or not name.endswith(CHECKED):
            continue
        reference = cache[name].to(torch.float64)
        total = (beta + gamma).to(torch.float64)
        error = (total - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
        assert error < 1e-4, f"{name}: relative error {error:.2e}"
        compared += 1
    error = ((beta_logits + gamma_logits).double() - logits.double()).abs().max() / logits.abs().max()
    assert error < 1e-4, f"logits: relative error {error:.2e}"
    return compared


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_gqa"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_beta_plus_gamma_is_the_real_activation_on_tiny_models(fixture, dtype, request):
    model = request.getfixturevalue(fixture)
    compared = _assert_exact(model, TINY_PROMPT, dtype)
    assert compared >= 12 * model.n_layers // 2


@pytest.mark.parametrize("options", [RuleOptions(product="symmetric"), RuleOptions(product="irrelevant_first"),
                                     RuleOptions(attention="value_only", stabilise=False)])
def test_every_rule_option_stays_exact(tiny_gqa, options):
    _assert_exact(tiny_gqa, TINY_PROMPT, "float32", options)


def test_rules_keep_the_sum_exactly():
    gen = torch.Generator().manual_seed(0)
    beta, gamma = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64), torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    beta[0, 0] = 0.0
    gamma[0, 0] = 0.0  # both parts 0: the bias must go to γ, not vanish (spec pitfall 13)
    weight, bias = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    b2, g2 = rules.linear((beta, gamma), weight, bias)
    torch.testing.assert_close(b2 + g2, (beta + gamma) @ weight + bias)
    torch.testing.assert_close(b2[0, 0], torch.zeros(4, dtype=torch.float64))
    b3, g3 = rules.stabilise((beta, gamma))
    torch.testing.assert_close(b3 + g3, beta + gamma)
    assert ((b3 * g3) >= 0).all() and not torch.equal(b3, beta)
    for mode in ("relevant_only", "symmetric", "irrelevant_first"):
        b4, g4 = rules.product((beta, gamma), (gamma, beta), mode)
        torch.testing.assert_close(b4 + g4, (beta + gamma) * (gamma + beta))
    b5, g5 = rules.activation((beta, gamma), torch.nn.functional.gelu)
    torch.testing.assert_close(b5 + g5, torch.nn.functional.gelu(beta + gamma))
    torch.testing.assert_close(g5, torch.nn.functional.gelu(gamma))


def test_nothing_relevant_means_beta_zero(tiny_llama):
    engine = Engine(tiny_llama)
    (beta, gamma), _ = engine.decompose(tiny_llama.encode(TINY_PROMPT))
    assert beta.abs().max() == 0.0


def test_planted_circuit_is_found_exactly(planted):
    model = planted
    batch = induction_batch(model)
    assert tasks.accuracy(model, [batch])["top1_accuracy"] == 1.0  # the planted mechanism works
    result = circuits.sweep(Engine(model), [batch])
    circuit = circuits.iterative_search(circuits.cdt_score_fn(result), 2, 4, per_iteration=3, max_heads=8,
                                        method="cd-t", min_relative=0.2)
    assert set(circuit.heads) == set(PLANTED)
    assert circuit.iterations == [[Head(1, 0)], [Head(0, 0)]]
    assert ("L1H0", "logits") in [(s, t) for s, t, _ in circuit.edges]
    assert ("L0H0", "L1H0") in [(s, t) for s, t, _ in circuit.edges]
    # the previous-token head acts on the induction head through its keys, not its queries or values
    k = result.to_input["k"][0, 0, 1, 0]
    assert k > 0.5 and result.to_input["q"][0, 0, 1, 0].abs() < 0.05 and result.to_input["v"][0, 0, 1, 0].abs() < 0.05
    # nothing upstream or in the same layer gets relevance
    assert result.to_z[1, :, :2].abs().max() == 0 and result.to_z[0, :, 0].abs().max() == 0
    # the circuit alone carries the behaviour
    means = [circuits.batch_means(model, batch)]
    base = circuits.faithfulness_baselines(model, [batch], means)
    assert base.of(circuits.metric_with_circuit(model, [batch], means, circuit.heads)) > 0.9
    assert base.of(circuits.metric_with_circuit(model, [batch], means, [Head(0, 1), Head(1, 1)])) < 0.1


def test_path_patching_agrees_on_the_planted_circuit(planted):
    model = planted
    batch = induction_batch(model, n=6)
    circuit = circuits.iterative_search(patching.path_patching_score_fn(model, [batch]), 2, 4, per_iteration=3,
                                        max_heads=8, method="path-patching", min_relative=0.2)
    assert set(circuit.heads) == set(PLANTED)


def test_receivers_capture_stops_at_the_last_receiver_layer_and_equals_a_full_forward(planted):
    """Path patching's capture pass (sender patched, every head frozen) reads the receivers' z and stops there:
    the layers after the last receiver never run, and the captured z equal those of a whole forward."""
    from probe.interventions import capture_z, intervene, mean_ablation, resample_ablation

    model = planted
    batch = induction_batch(model, n=4)
    heads = model.all_heads()
    mu = circuits.batch_means(model, batch)
    clean = capture_z(model, batch.ids, heads)
    frozen = [resample_ablation(heads, clean), mean_ablation([Head(0, 1)], mu)]
    receivers = [Head(0, 2), Head(0, 3)]
    later: list[int] = []
    with model.hooks([("blocks.1.hook_resid_pre", lambda x, hook: later.append(1))]):
        captured = patching._capture_receivers(model, batch.ids, receivers, frozen)
    assert later == []  # the forward stopped after layer 0

    reference: dict[Head, torch.Tensor] = {}

    def grab(z: torch.Tensor, hook) -> None:
        for r in receivers:
            reference[r] = z[:, :, r.head].clone()

    with model.hooks([("blocks.0.attn.hook_z", grab)]), intervene(model, frozen):
        model.logits(batch.ids)
    assert set(captured) == set(receivers)
    assert all(torch.equal(captured[r], reference[r]) for r in receivers)


def test_independent_target_says_relevance_zero(tiny_llama):
    engine = Engine(tiny_llama)
    batch = tasks.LogitDiffBatch("t", tiny_llama.encode(TINY_PROMPT), torch.tensor([5]), torch.tensor([6]),
                                 tiny_llama.encode("the key of john is the book of mary and the capital"), [TINY_PROMPT])
    upstream = circuits.head_relevance(engine, batch, Head(1, 0), Head(0, 2))
    assert upstream.value == 0.0 and not upstream.depends and "does not depend" in upstream.note
    downstream = circuits.head_relevance(engine, batch, Head(0, 1), Head(1, 2), "q")
    assert downstream.depends and downstream.value != 0.0


def test_unsupported_architecture_is_a_clear_error():
    fake = types.SimpleNamespace(hf_model=torch.nn.Linear(2, 2), spec="hf:something")
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Gemma3ForCausalLM"):
        read_weights(fake)


@pytest.mark.embedded
def test_exact_on_smollm2(smollm2):
    assert _assert_exact(smollm2, IOI_PROMPT) >= 12 * smollm2.n_layers


@pytest.mark.embedded
def test_exact_on_gemma3(gemma3):
    assert _assert_exact(gemma3, IOI_PROMPT) >= 12 * gemma3.n_layers


def test_word_relevance_points_at_the_copied_word_like_occlusion(planted):
    from analyses.cdt.local import token_relevance

    model = planted
    result = token_relevance(model, "c f a h b d a", good="h", bad="a")
    assert result.words[max(range(len(result.words)), key=lambda i: result.cdt[i])] == "h"
    top_occluded = sorted(range(len(result.words)), key=lambda i: -result.occlusion[i])[:3]
    assert 3 in top_occluded  # "h" (also both "a": they set the attention pattern, which the paper's
    assert result.full > 5     # attention rule credits to γ, so CD-T gives them ~0; see docs/cdt.md)
    assert abs(result.cdt[2]) < 0.1 * result.cdt[3]


def test_figures_and_json_round_trip(planted):
    from analyses.cdt import plots as figs

    model = planted
    batch = induction_batch(model, n=4)
    result = circuits.sweep(Engine(model), [batch])
    circuit = circuits.iterative_search(circuits.cdt_score_fn(result), 2, 4, 3, 8, "cd-t", 0.2)
    again = circuits.Circuit.from_json(circuit.to_json())
    assert again.heads == circuit.heads and again.edges == circuit.edges
    graph = figs.circuit_graph(circuit, 2, 4)
    assert len(graph.data) == 3  # two edges + the nodes
    assert figs.relevance_heatmap(result.to_output, "x").data[0].z is not None
    assert len(figs.faithfulness_curves([1, 2], {"cd-t": [0.5, 1.0], "random_all": [[0.1], [0.2]]}).data) == 3


def _two_prompt_batch(model) -> tasks.LogitDiffBatch:
    ids = torch.cat([model.encode(TINY_PROMPT), model.encode("the key of john is the book of mary and the capital")])
    refs = torch.cat([model.encode("the book of mary is the key of john and the capital"),
                      model.encode("the key of the capital is the book of john and mary")])
    return tasks.LogitDiffBatch("t", ids, torch.tensor([5, 7]), torch.tensor([6, 8]), refs, [])


@pytest.mark.parametrize("fixture,options", [
    ("tiny_gpt2", RuleOptions()), ("tiny_gqa", RuleOptions()), ("tiny_gqa", RuleOptions(product="symmetric")),
    ("tiny_llama", RuleOptions(product="irrelevant_first")), ("tiny_gqa", RuleOptions(attention="value_only", stabilise=False)),
])
def test_fast_sweep_equals_the_two_stream_reference(fixture, options, request):
    """The β-only sweep (γ = cached total − β) gives the same relevances as carrying both streams."""
    model = request.getfixturevalue(fixture)
    engine = Engine(model, "float64", options)
    batch = _two_prompt_batch(model)
    slow, quick = circuits.sweep(engine, [batch]), fast.fast_sweep(engine, [batch])
    assert slow.to_output.abs().max() > 1e-4 and slow.to_input["k"].abs().max() > 1e-4
    # the reference starts each source layer from the bridge's float32 residual, the fast sweep from
    # its own float64 pass: they agree to float32 rounding, amplified a little through the layers
    for name, a, b in [("output", slow.to_output, quick.to_output), ("z", slow.to_z, quick.to_z),
                       *[(c, slow.to_input[c], quick.to_input[c]) for c in "qkv"]]:
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), name


def test_run_finds_the_planted_circuit_and_round_trips(planted):
    """run() end to end on the planted model: the circuit, the contract (scores, JSON, summary, figures)."""
    config = cdt.CDTConfig(task="planted-induction", discovery_per_template=6, evaluation_per_template=8,
                           per_iteration=3, max_heads=6, min_relative=0.2, random_draws=3, baseline=True)
    seen = []
    result = cdt.run(planted, config, progress=lambda f, m: seen.append(f))
    assert set(result.circuit.heads) == set(PLANTED)
    assert set(circuits.Circuit.from_json(result.extra["baseline_circuit"]).heads) == set(PLANTED)
    assert result.faithfulness["cd-t"][-1] > 0.9 and max(result.faithfulness["random_all"][-1]) < 0.5
    assert result.scores.top(1)[0][0] == Head(1, 0) and result.scores.scores.shape == (2, 4)
    assert seen[-1] == 1.0 and seen == sorted(seen)
    data = json.loads(json.dumps(result.to_json()))
    assert "scores" in data
    again = cdt.CDTResult.from_json(data)
    assert torch.equal(again.scores.scores, result.scores.scores.double()) and again.circuit.heads == result.circuit.heads
    assert set(cdt.figures(again)) == {"circuit", "relevance", "faithfulness"}
    text = cdt.summary(again)
    assert "L1H0" in text and "path patching" in text


@pytest.fixture(scope="module")
def tiny_gqa_with_list_words():
    """The tiny GQA shape with a vocabulary that holds the successor prompts' words ("one," ...):
    the default word tokenizer splits on whitespace only, so "one," is unknown to it."""
    from probe.models import wrap_hf_model
    from probe.tiny import NUMBER_WORDS, default_vocabulary, tiny_llama, word_tokenizer

    tokenizer = word_tokenizer(default_vocabulary() + [f"{w}," for w in NUMBER_WORDS], name="probe/tiny-gqa-lists")
    return wrap_hf_model(tiny_llama(len(tokenizer), n_heads=4, n_kv_heads=2, seed=1), tokenizer,
                         "tiny-gqa-lists", hub_name="probe/tiny-gqa-lists", device="cpu")


def test_task_refuses_prompts_the_tokenizer_cannot_represent(tiny_gqa):
    """On the plain tiny tokenizer every successor prompt is `<bos> <unk> <unk> ...`: a clear error,
    not a run whose full and ablated metrics are equal (that divided by zero in faithfulness)."""
    with pytest.raises(CDTError, match="cannot represent the task prompt 'one, two, three, four,'"):
        tasks.successor_batches(tiny_gqa, kinds=("numbers",), run=4)
    with pytest.raises(CDTError, match="cannot represent"):
        cdt.run(tiny_gqa, cdt.CDTConfig(task="successor", baseline=False))


def test_degenerate_metric_is_an_error_not_a_division():
    base = circuits.Faithfulness(full=3.7e-9, empty=3.7e-9)
    assert base.degenerate
    with pytest.raises(CDTError, match="degenerate"):
        base.of(1.0)
    healthy = circuits.Faithfulness(full=2.0, empty=0.5)
    assert not healthy.degenerate and healthy.of(1.25) == pytest.approx(0.5)


def test_run_on_a_tiny_llama_and_bad_config(tiny_gqa, tiny_gqa_with_list_words):
    batches = tasks.successor_batches(tiny_gqa_with_list_words, kinds=("numbers",), run=4)
    unk = tiny_gqa_with_list_words.tokenizer.unk_token_id
    assert all(bool((b.ids != unk).all()) for b in batches)
    result = cdt.run(tiny_gqa_with_list_words, cdt.CDTConfig(task="successor", per_iteration=2, max_heads=3,
                                                             random_draws=2, curve_every=2, baseline=False,
                                                             prune=False))
    assert abs(result.full_metric - result.empty_metric) > 1e-3
    assert result.sizes == [2, 3] and len(result.circuit.heads) == 3
    assert "skipped" in cdt.summary(result)
    assert cdt.CDTResult.from_json(json.loads(json.dumps(result.to_json()))).circuit.heads == result.circuit.heads
    with pytest.raises(CDTError, match="target_mode"):
        cdt.run(tiny_gqa, cdt.CDTConfig(target_mode="sideways"))
    with pytest.raises(CDTError, match="planted model"):
        cdt.run(tiny_gqa, cdt.CDTConfig(task="planted-induction"))


@pytest.mark.embedded
def test_quick_run_on_smollm2_beats_random_circuits(smollm2):
    """The demo preset end to end on SmolLM2 IOI, with 10 random circuits per size: the CD-T circuit's
    faithfulness exceeds the random circuits' mean by more than their whole spread (max − min)."""
    import dataclasses

    result = cdt.run(smollm2, dataclasses.replace(cdt.QUICK, random_draws=10))
    assert result.accuracy["top1_accuracy"] >= 0.8 and result.full_metric > result.empty_metric + 1.0
    assert result.sizes == list(range(4, cdt.QUICK.max_heads + 1, 4))
    assert len(result.circuit.heads) == cdt.QUICK.max_heads
    for value, draws in zip(result.faithfulness["cd-t"], result.faithfulness["random_all"]):
        assert len(draws) == 10
        mean, spread = sum(draws) / len(draws), max(draws) - min(draws)
        assert value > mean + spread, (value, draws)
    again = cdt.CDTResult.from_json(json.loads(json.dumps(result.to_json())))
    assert set(cdt.figures(again)) == {"circuit", "relevance", "faithfulness"}
    assert "skipped" in cdt.summary(again)
