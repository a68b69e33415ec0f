"""CD-T: exact decomposition on every supported architecture, the rules' invariants, a planted circuit,
agreement with path patching, bad input, and a causal check on SmolLM2."""

from __future__ import annotations

import types

import pytest
import torch

from analyses.cdt import circuits, patching, rules, tasks
from analyses.cdt.arch import UnsupportedArchitectureError, read_weights
from analyses.cdt.engine import Engine, RuleOptions
from analyses.cdt.planted import PLANTED, induction_batch, planted_induction_model
from probe.heads import Head

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


def test_planted_circuit_is_found_exactly():
    model = planted_induction_model()
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


def test_path_patching_agrees_on_the_planted_circuit():
    model = planted_induction_model()
    batch = induction_batch(model, n=6)
    circuit = circuits.iterative_search(patching.path_patching_score_fn(model, [batch]), 2, 4, per_iteration=3,
                                        max_heads=8, method="path-patching", min_relative=0.2)
    assert set(circuit.heads) == set(PLANTED)


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


def test_word_relevance_points_at_the_copied_word_like_occlusion():
    from analyses.cdt.local import token_relevance

    model = planted_induction_model()
    result = token_relevance(model, "c f a h b d a", good="h", bad="a")
    assert result.words[max(range(len(result.words)), key=lambda i: result.cdt[i])] == "h"
    top_occluded = sorted(range(len(result.words)), key=lambda i: -result.occlusion[i])[:3]
    assert 3 in top_occluded  # "h" (also both "a": they set the attention pattern, which the paper's
    assert result.full > 5     # attention rule credits to γ, so CD-T gives them ~0; see docs/cdt.md)
    assert abs(result.cdt[2]) < 0.1 * result.cdt[3]


def test_figures_and_json_round_trip():
    from analyses.cdt import plots as figs

    model = planted_induction_model()
    batch = induction_batch(model, n=4)
    result = circuits.sweep(Engine(model), [batch])
    circuit = circuits.iterative_search(circuits.cdt_score_fn(result), 2, 4, 3, 8, "cd-t", 0.2)
    again = circuits.Circuit.from_json(circuit.to_json())
    assert again.heads == circuit.heads and again.edges == circuit.edges
    graph = figs.circuit_graph(circuit, 2, 4)
    assert len(graph.data) == 3  # two edges + the nodes
    assert figs.relevance_heatmap(result.to_output, "x").data[0].z is not None
    assert len(figs.faithfulness_curves([1, 2], {"cd-t": [0.5, 1.0], "random_all": [[0.1], [0.2]]}).data) == 3
