"""Factual-recall heads: scorer, data, planted mechanism, reference agreement, causal check on real models."""

from __future__ import annotations

import json

import pytest
import torch

from analyses import factual as F
from analyses.data.capitals import Capital
from analyses.data.counterfactual import (
    CounterfactualDataError,
    answer_tokens,
    build_counterfactuals,
    build_plain,
    default_pool,
    prompt_text,
    split_countries,
)
from analyses.factual.behaviour import fast_rates, generation_rates
from analyses.factual.causal import causal_checks
from analyses.factual.prompts import check_disjoint
from analyses.factual.rates import Rates, cut_answer, rates_from_labels
from analyses.planted.factual import IN_CONTEXT_HEAD, MEMORY_HEAD, PLANTED_TABLE, planted_factual_model
from analyses.stats import StatisticsError, cluster_bootstrap_interval, wilson_interval
from probe.heads import Head
from probe.interventions import scale, zero_ablation

PLANTED_POOL = [Capital(country, city) for country, city in PLANTED_TABLE]


@pytest.fixture(scope="module")
def planted():
    return planted_factual_model()


@pytest.fixture(scope="module")
def planted_prompts(planted):
    return build_counterfactuals(planted.tokenizer, PLANTED_POOL, 24, seed=3).prompts


# ---- scorer and intervals ------------------------------------------------------------------------

def test_answer_is_cut_at_the_next_question_or_newline():
    assert cut_answer(" Paris\nQ: What is") == "Paris"
    assert cut_answer(" London Q: What is the capital") == "London"


@pytest.mark.parametrize("text,label", [
    (" Warsaw", "memorised"), (" London", "in_context"), (" Berlin", "other"),
    (" London, no wait, Warsaw", "memorised"),           # memorised takes precedence
    (" Paris\nQ: The capital is London", "other"),       # after the cut nothing counts
    (" Londonderry", "other"),                           # whole words only
    (" warsaw.", "memorised"),                           # case-insensitive
    ("", "other"),
])
def test_classify_answer(text, label):
    assert F.classify_answer(text, ("Warsaw",), "London") == label


def test_variants_of_the_true_capital_count_as_memorised():
    assert F.classify_answer(" Kishinev", ("Chișinău", "Chisinau", "Kishinev"), "Rome") == "memorised"


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    low, high = wilson_interval(8, 10)
    assert low < 0.8 < high
    wide, narrow = wilson_interval(50, 100), wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1
    with pytest.raises(StatisticsError):
        wilson_interval(0, 0)


def _clustered(within_country_mixed: bool) -> tuple[list[str], list[str]]:
    """10 countries x 8 prompts, rate 0.5: either whole countries answer alike (clustered), or every
    country answers half and half (no cluster effect)."""
    labels, clusters = [], []
    for c in range(10):
        for k in range(8):
            hit = (k % 2 == 0) if within_country_mixed else (c < 5)
            labels.append("in_context" if hit else "memorised")
            clusters.append(f"country{c}")
    return labels, clusters


def test_cluster_bootstrap_is_wider_than_wilson_when_countries_answer_alike():
    labels, clusters = _clustered(within_country_mixed=False)
    rates = rates_from_labels(labels, clusters=clusters, seed=3)
    assert rates.rate("in_context") == 0.5 and rates.interval_method == "cluster bootstrap over countries"
    low, high = rates.interval("in_context")
    w_low, w_high = wilson_interval(40, 80)
    assert low < 0.5 < high
    assert high - low > 2 * (w_high - w_low)  # 10 independent countries, not 80 independent prompts
    assert (low, high) == rates.interval("in_context")  # seeded
    # Same rate, but every country half and half: resampling countries barely moves the rate.
    labels, clusters = _clustered(within_country_mixed=True)
    mixed = rates_from_labels(labels, clusters=clusters, seed=3).interval("in_context")
    assert mixed[1] - mixed[0] < 0.5 * (w_high - w_low)
    # One prompt per country, or no countries: Wilson intervals.
    assert rates_from_labels(labels[:10], clusters=[f"c{i}" for i in range(10)]).interval_method == "Wilson"
    assert rates_from_labels(labels).interval("in_context") == wilson_interval(40, 80)
    again = Rates.from_json(json.loads(json.dumps(rates.to_json())))
    assert again.interval("in_context") == (low, high)
    assert again.to_json()["interval_method"] == "cluster bootstrap over countries"


def test_cluster_bootstrap_weighs_clusters_by_their_prompts():
    """Unequal clusters: the statistic is the pooled rate of the drawn countries (ratio estimator), as
    the point estimate is. One country with 20 prompts, all in-context, and 4 with one prompt each, none:
    pooled 20/24 = 0.83. Any draw that contains the big country pools to >= 0.83, so the upper bound is
    >= 0.83; the mean of per-country rates would top out at 0.6 (3 of 5 draws big: P 0.058)."""
    labels = ["in_context"] * 20 + ["memorised"] * 4
    clusters = ["big"] * 20 + ["a", "b", "c", "d"]
    values = [float(x == "in_context") for x in labels]
    low, high = cluster_bootstrap_interval(values, clusters, seed=0)
    assert low < 20 / 24 <= high <= 1.0
    with pytest.raises(StatisticsError, match="cluster labels"):
        cluster_bootstrap_interval(values, clusters[:-1])


# ---- data ----------------------------------------------------------------------------------------

def test_prompt_format_matches_the_paper():
    assert prompt_text("Poland", "London", "plain") == \
        "The capital of Poland is London.\nQ: What is the capital of Poland?\nA:"
    assert prompt_text("Poland", None, "plain") == "Q: What is the capital of Poland?\nA:"
    with pytest.raises(CounterfactualDataError):
        prompt_text("Poland", "London", "markdown")
    with pytest.raises(CounterfactualDataError):
        prompt_text("Poland", "London", "chat")  # no formatter


def test_prompts_are_seeded_and_never_use_the_true_capital(planted):
    a = build_counterfactuals(planted.tokenizer, PLANTED_POOL, 20, seed=1)
    b = build_counterfactuals(planted.tokenizer, PLANTED_POOL, 20, seed=1)
    c = build_counterfactuals(planted.tokenizer, PLANTED_POOL, 20, seed=2)
    assert [p.text for p in a.prompts] == [p.text for p in b.prompts] != [p.text for p in c.prompts]
    assert all(p.context_city != p.capital for p in a.prompts)
    assert len({p.country for p in a.prompts}) == len(PLANTED_POOL)  # round-robin covers every country


def test_pairs_sharing_a_first_token_are_dropped_and_counted(planted):
    tokenizer = planted.tokenizer
    # Both "capitals" start with the same (unknown-free) token "Paris" once the tokenizer splits them.
    pool = [Capital("France", "Paris"), Capital("Spain", "Paris Madrid"), Capital("Italy", "Rome")]
    built = build_counterfactuals(tokenizer, pool, 10, seed=0)
    pairs = {(p.capital, p.context_city) for p in built.prompts}
    assert ("Paris", "Paris Madrid") not in pairs and ("Paris Madrid", "Paris") not in pairs
    assert len(built.dropped_shared_first_token) == 2
    assert all(p.memorised_token != p.in_context_token for p in built.prompts)
    multi = [p for p in built.prompts if "Paris Madrid" in (p.capital, p.context_city)]
    assert multi and all(p.multi_token for p in multi)  # multi-token answers are kept and flagged


def test_unknown_tokens_and_empty_splits_are_clear_errors(planted):
    pool = [Capital("France", "Paris"), Capital("Atlantis", "Poseidonia")]
    built = build_counterfactuals(planted.tokenizer, pool + [Capital("Italy", "Rome")], 10, seed=0)
    assert "Poseidonia" in built.dropped_unknown_token
    assert all("Poseidonia" not in (p.capital, p.context_city) for p in built.prompts)
    with pytest.raises(CounterfactualDataError, match="empty"):
        build_counterfactuals(planted.tokenizer, [], 10, seed=0)
    with pytest.raises(CounterfactualDataError, match="No usable"):
        build_counterfactuals(planted.tokenizer, pool[1:] + [Capital("Nowhere", "Xanadu")], 10, seed=0)
    with pytest.raises(CounterfactualDataError):
        split_countries(PLANTED_POOL, 1.0, seed=0)
    with pytest.raises(F.FactualError, match="empty split"):
        fast_rates(planted, [])


def test_first_token_is_that_of_the_space_prefixed_city_on_smollm2_style_tokenizers(planted):
    assert answer_tokens(planted.tokenizer, "Paris", "plain") == [planted.tokenizer.get_vocab()["Paris"]]
    plain = build_plain(planted.tokenizer, PLANTED_POOL)
    assert all(not p.is_counterfactual and p.in_context_token == -1 for p in plain.prompts)


def test_default_pool_leaves_out_city_states():
    names = {c.country for c in default_pool()}
    assert "Monaco" not in names and "Luxembourg" not in names and "France" in names
    assert len(default_pool()) > 170


# ---- planted mechanism ---------------------------------------------------------------------------

def test_attribution_finds_the_planted_heads_with_the_right_signs(planted, planted_prompts):
    attribution = F.head_attribution(planted, planted_prompts)
    mean = attribution.mean
    assert mean[IN_CONTEXT_HEAD.layer, IN_CONTEXT_HEAD.head] > 1.0
    assert mean[MEMORY_HEAD.layer, MEMORY_HEAD.head] < -1.0
    others = mean.clone()
    others[IN_CONTEXT_HEAD.layer, IN_CONTEXT_HEAD.head] = 0
    others[MEMORY_HEAD.layer, MEMORY_HEAD.head] = 0
    assert others.abs().max() < 1e-6
    # No MLP, no bias: the heads' direct effects add up to the real logit difference.
    torch.testing.assert_close(attribution.per_prompt.sum((1, 2)), attribution.clean_diff, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["planted", "tiny_llama", "tiny_gpt2"])
def test_attribution_equals_removing_the_direct_path_with_the_norm_frozen(fixture, request, planted_prompts):
    """Fast all-heads DLA == slow per-head forward passes (z zeroed at the last position, later
    components patched back, final norm scale frozen), to 1e-4, on RMSNorm and LayerNorm models."""
    model = request.getfixturevalue(fixture)
    if fixture == "planted":
        prompts = planted_prompts[:3]
    else:  # random models: any two distinct vocabulary tokens serve as the two answers
        prompts = [F.CounterfactualPrompt("mary", ("book",), "key", "the capital of mary is the key . q: what",
                                          model.tokenizer.get_vocab()["book"], model.tokenizer.get_vocab()["key"],
                                          False)]
    attribution = F.head_attribution(model, prompts)
    assert attribution.per_prompt.abs().max() > 1e-3
    for index, prompt in enumerate(prompts):
        for head in model.all_heads():
            reference = F.reference_direct_effect(model, prompt, head)
            assert abs(reference - float(attribution.per_prompt[index, head.layer, head.head])) < 1e-4, head


def test_scaling_the_planted_heads_moves_the_rates_as_expected(planted, planted_prompts):
    config = F.FactualConfig(table=PLANTED_TABLE)
    base = generation_rates(planted, planted_prompts, config)
    assert base.rate("in_context") == 1.0  # copy gain 3 > memory gain 2
    silenced = generation_rates(planted, planted_prompts, config, scale([IN_CONTEXT_HEAD], "value", 0.0))
    assert silenced.rate("memorised") == 1.0
    boosted = generation_rates(planted, planted_prompts, config, scale([MEMORY_HEAD], "value", 2.0))
    assert boosted.rate("memorised") == 1.0  # 2 x 2 > 3
    mild = generation_rates(planted, planted_prompts, config, scale([MEMORY_HEAD], "value", 1.2))
    assert mild.rate("in_context") == 1.0    # 1.2 x 2 < 3: no flip
    fast = fast_rates(planted, planted_prompts, scale([IN_CONTEXT_HEAD], "value", 0.0))
    assert fast.prefers_in_context == 0.0 and fast.argmax_memorised == 1.0


def test_full_run_on_the_planted_model(planted):
    config = F.FactualConfig(table=PLANTED_TABLE, n_tuning=16, n_heldout=16, candidates_per_direction=2,
                             ablate_top_k=1, random_draws=3, factors=(-1.0, 0.0, 1.0, 2.0))
    result = F.run(planted, config)
    assert result.top_in_context[0][0] == str(IN_CONTEXT_HEAD)
    assert result.top_memory[0][0] == str(MEMORY_HEAD)
    best = result.best["memorised"]
    assert best["head"] in (str(IN_CONTEXT_HEAD), str(MEMORY_HEAD))
    assert Rates.from_json(best["heldout_generation"]).rate("memorised") == 1.0
    assert result.causal["ablate_in_context_heads"]["beats_all_random"]
    assert result.causal["ablate_memory_heads"]["beats_all_random"]
    assert result.known["n_known"] == len(PLANTED_TABLE)
    again = F.FactualResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.best == result.best and torch.equal(again.scores.scores.float(), result.scores.scores.float())
    assert set(F.figures(again)) == {"attribution", "top_heads", "scaling"}
    assert "best towards memorised" in F.summary(again)


def test_memory_dominant_planted_model_is_steered_to_context():
    model = planted_factual_model(copy_gain=2.0, memory_gain=3.0)
    prompts = build_counterfactuals(model.tokenizer, PLANTED_POOL, 12, seed=5).prompts
    config = F.FactualConfig(table=PLANTED_TABLE)
    assert generation_rates(model, prompts, config).rate("memorised") == 1.0
    flipped = generation_rates(model, prompts, config, scale([MEMORY_HEAD], "value", -1.0))
    assert flipped.rate("in_context") == 1.0


def test_held_out_causal_test_refuses_tuning_countries(planted, planted_prompts):
    """The countries the heads are chosen on never enter the held-out causal test: check_disjoint
    (called by run and causal_checks) names the shared countries; a disjoint split passes."""
    tuning_countries, heldout_countries = split_countries(PLANTED_POOL, 0.5, seed=0)
    tuning = build_counterfactuals(planted.tokenizer, tuning_countries, 8, seed=0).prompts
    heldout = build_counterfactuals(planted.tokenizer, heldout_countries, 8, seed=1).prompts
    check_disjoint(tuning, heldout)
    leaked = heldout + tuning[:1]
    with pytest.raises(F.SplitOverlapError, match=rf"1 tuning country \({tuning[0].country}\).*disjoint"):
        check_disjoint(tuning, leaked)
    config = F.FactualConfig(table=PLANTED_TABLE, random_draws=1, ablate_top_k=1)
    best = {d: {"head": str(IN_CONTEXT_HEAD), "factor": 0.0, "heldout_fast": {"mean_logit_diff": 0.0}}
            for d in ("in_context", "memorised")}
    baseline = fast_rates(planted, heldout)
    with pytest.raises(F.SplitOverlapError):
        causal_checks(planted, leaked, [IN_CONTEXT_HEAD], [MEMORY_HEAD], best, config, baseline, tuning=tuning)
    out = causal_checks(planted, heldout, [IN_CONTEXT_HEAD], [MEMORY_HEAD], best, config, baseline, tuning=tuning)
    assert out["n_tuning_countries"] + out["n_heldout_countries"] <= len(PLANTED_POOL)


def test_bad_configuration_is_a_clear_error(planted):
    with pytest.raises(F.FactualError, match="template"):
        F.run(planted, F.FactualConfig(table=PLANTED_TABLE, template="markdown"))
    with pytest.raises(F.FactualError, match="chat template"):
        F.run(planted, F.FactualConfig(table=PLANTED_TABLE, template="chat"))
    with pytest.raises(F.FactualError, match="empty split"):
        F.run(planted, F.FactualConfig(table=PLANTED_TABLE, n_heldout=0))
    with pytest.raises(F.FactualError, match="at least 4"):
        F.run(planted, F.FactualConfig(table=PLANTED_TABLE[:2]))


# ---- embedded models -----------------------------------------------------------------------------

def _known_prompts(model, n, seed, template="plain"):
    formatter = model.chat_prompt if template == "chat" else None
    pool = default_pool()
    return build_counterfactuals(model.tokenizer, pool, n, seed, template, formatter).prompts


@pytest.mark.embedded
def test_reference_agreement_on_smollm2(smollm2):
    prompts = _known_prompts(smollm2, 2, seed=0)
    attribution = F.head_attribution(smollm2, prompts)
    for head in (Head(0, 0), Head(15, 4), Head(29, 8)):
        reference = F.reference_direct_effect(smollm2, prompts[1], head)
        assert abs(reference - float(attribution.per_prompt[1, head.layer, head.head])) < 1e-4


@pytest.mark.embedded
def test_reference_agreement_on_gemma3_with_post_attention_norms(gemma3):
    prompts = _known_prompts(gemma3, 2, seed=0)
    attribution = F.head_attribution(gemma3, prompts)
    for head in (Head(0, 1), Head(9, 2), Head(17, 3)):
        reference = F.reference_direct_effect(gemma3, prompts[0], head)
        assert abs(reference - float(attribution.per_prompt[0, head.layer, head.head])) < 1e-4


@pytest.mark.embedded
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_top_heads_move_the_logit_difference_more_than_random_heads(fixture, request):
    """Causal check: zero-ablating the top-3 memory heads raises d, the top-3 in-context heads lower
    it, each more than 4 seeded random sets of 3 heads (which exclude the top heads); the held-out
    prompts ask about other countries than the tuning prompts the heads were chosen on."""
    model = request.getfixturevalue(fixture)
    tuning_countries, heldout_countries = split_countries(default_pool(), 0.5, seed=0)
    tuning = build_counterfactuals(model.tokenizer, tuning_countries, 24, 0, context_pool=default_pool()).prompts
    heldout = build_counterfactuals(model.tokenizer, heldout_countries, 24, 1, context_pool=default_pool()).prompts
    check_disjoint(tuning, heldout)  # held-out countries are not the ones the heads were chosen on
    scores = F.head_attribution(model, tuning).mean
    flat = scores.flatten()
    order = torch.argsort(flat)
    memory = [Head(int(i) // model.n_heads, int(i) % model.n_heads) for i in order[:3]]
    in_context = [Head(int(i) // model.n_heads, int(i) % model.n_heads) for i in order.flip(0)[:3]]
    from analyses.common import random_head_sets

    base = fast_rates(model, heldout).mean_logit_diff
    up = fast_rates(model, heldout, zero_ablation(memory)).mean_logit_diff - base
    down = fast_rates(model, heldout, zero_ablation(in_context)).mean_logit_diff - base
    randoms = [fast_rates(model, heldout, zero_ablation(s)).mean_logit_diff - base
               for s in random_head_sets(model, 3, 4, memory + in_context, seed=0)]
    assert up > 0 and up > max(randoms)
    assert down < 0 and down < min(randoms)
