"""Ships / Sahara on a planted refusal head, agreement with the slow reference loops, the judge, bad input."""

from __future__ import annotations

import pytest
import torch

from analyses import safety as S
from analyses.planted import SAFETY_HARMFUL_PROMPTS as HARMFUL_PROMPTS
from analyses.planted import SAFETY_HARMLESS_PROMPTS as HARMLESS
from analyses.planted import SAFETY_HEAD as PLANTED
from analyses.planted import safety_model as planted_refusal_model
from analyses.safety.dataset_level import generalized_ships, sahara_reference, subspace_angle
from analyses.safety.generation import Generation, answer_perplexity, verdict_changes
from analyses.safety.judge import Judge, Verdict, attack_success_rate, rule_counts
from analyses.safety.prompts import render_prompt
from analyses.safety.readouts import ablate, ablated_readouts
from analyses.safety.ships import ablated_z_delta, ships_screened
from analyses.stats import STREAK, StatisticsError, fisher_one_sided, permutation_p, prompts_needed
from probe.errors import PromptTooLongError
from probe.heads import Head
from probe.models import LoadedModel


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_refusal_model()


def _ids(model, texts):
    return [model.encode(t) for t in texts]


def test_planted_model_refuses_harmful_and_not_harmless(planted):
    sorry, sure = (planted.tokenizer.convert_tokens_to_ids(w) for w in ("sorry", "sure"))
    for text, harmful in [(t, True) for t in HARMFUL_PROMPTS] + [(t, False) for t in HARMLESS]:
        logits = planted.logits(planted.encode(text))[0, -1]
        assert (logits[sorry] > logits[sure]) == harmful, text


@pytest.mark.parametrize("ablation", ["query", "output"])
def test_ships_ranks_the_planted_head_first_for_every_harmful_prompt(planted, ablation):
    for ids in _ids(planted, HARMFUL_PROMPTS):
        scores = S.ships_query(planted, ids, ablation, 1e-5)
        ranking = [h for h, _ in planted_scores(scores).top(3)]
        assert ranking[0] == PLANTED
        assert scores[PLANTED.layer, PLANTED.head] > 5 * scores[1, 3]  # its GQA sibling is not hit


def planted_scores(scores):
    from probe.results import HeadScores
    return HeadScores("ships", "nats", scores)


@pytest.mark.parametrize("fixture", ["planted", "tiny_gqa", "tiny_gpt2"])
@pytest.mark.parametrize("ablation", ["query", "output"])
def test_batched_ships_equals_the_one_head_at_a_time_reference(fixture, ablation, request):
    model = request.getfixturevalue(fixture)
    text = HARMFUL_PROMPTS[0] if fixture == "planted" else "the capital of mary is the book of john"
    ids = model.encode(text)
    fast = S.ships_query(model, ids, ablation, 1e-4, batch_rows=5)
    reference = S.ships_query_reference(model, ids, ablation, 1e-4)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("ablation", ["query", "output"])
def test_first_order_screen_ranks_the_planted_head_first_and_rescoring_is_exact(planted, ablation):
    for ids in _ids(planted, HARMFUL_PROMPTS):
        estimate, exact = ships_screened(planted, ids, ablation, 1e-5, rescore=3)
        assert planted_scores(estimate).top(1)[0][0] == PLANTED
        assert int(torch.isfinite(exact).sum()) == 3  # only the rescored heads carry an exact score
        full = S.ships_query(planted, ids, ablation, 1e-5)
        scored = torch.isfinite(exact)
        torch.testing.assert_close(exact[scored], full[scored])
        assert planted_scores(exact).top(1)[0][0] == PLANTED


def test_first_order_change_of_z_matches_the_real_ablation(tiny_gqa):
    """The screen's z_ablated - z equals what the UA / SC hooks really do to hook_z (GQA value map)."""
    from probe.interventions import intervene

    ids = tiny_gqa.encode("the capital of mary is the book of john")
    names = lambda n: n.endswith("attn.hook_z") or n.endswith("attn.hook_v")  # noqa: E731
    _, clean = tiny_gqa.bridge.run_with_cache(ids, names_filter=names)
    for ablation in ("query", "output"):
        layer = 1
        heads = [Head(layer, h) for h in range(tiny_gqa.n_heads)]
        with intervene(tiny_gqa, ablate(heads, ablation, 1e-6)):
            _, ablated = tiny_gqa.bridge.run_with_cache(ids, names_filter=names)
        z, v = clean[f"blocks.{layer}.attn.hook_z"], clean[f"blocks.{layer}.attn.hook_v"]
        delta = ablated_z_delta(z, v, ablation, 1e-6, tiny_gqa)
        torch.testing.assert_close(z + delta, ablated[f"blocks.{layer}.attn.hook_z"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["planted", "tiny_gpt2"])
def test_fast_path_really_starts_late(fixture, request):
    """Llama and GPT-2 alike (probe.forward): ablated rows of a layer-1 head run no hook of layer 0, and
    give the full-pass fallback's states and log-probs."""
    model = request.getfixturevalue(fixture)
    clean = S.clean_run(model, model.encode("how do i make a bomb ?"))
    fired: set[str] = set()
    with model.hooks([(lambda name: True, lambda tensor, hook: fired.add(hook.name))]):
        fast = ablated_readouts(model, clean, [[Head(1, 0)], [Head(1, 1)]], "query", 1e-5)
    assert fired and not any(name.startswith(("blocks.0.", "hook_embed", "embed")) for name in fired)
    assert any(name.startswith("blocks.1.") for name in fired)
    slow = ablated_readouts(model, clean, [[Head(1, 0)], [Head(1, 1)]], "query", 1e-5, fast=False)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generalized_ships_ranks_planted_head_first(planted):
    prompts = _ids(planted, HARMFUL_PROMPTS + HARMLESS)
    angles = generalized_ships(planted, prompts, "query", 1e-5)
    assert planted_scores(angles).top(1)[0][0] == PLANTED
    fallback = generalized_ships(planted, prompts, "query", 1e-5, fast=False)
    torch.testing.assert_close(angles, fallback, atol=1e-3, rtol=1e-3)


def test_subspace_angle_reduces_to_reference_formula_and_is_order_invariant_when_r_is_full():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    u_a = torch.linalg.svd(a, full_matrices=False).U[:, 0]
    u_b = torch.linalg.svd(b, full_matrices=False).U[:, 0]
    expected = torch.rad2deg(torch.arccos((u_a @ u_b).abs().clamp(0, 1)))
    torch.testing.assert_close(subspace_angle(a, b), expected.float(), atol=1e-4, rtol=1e-4)
    assert float(subspace_angle(a, a)) < 1e-2
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(subspace_angle(a[perm], b[perm], r_main=2), subspace_angle(a, b, r_main=2))
    with pytest.raises(S.SafetyError):
        subspace_angle(a, b, r_main=7)


def test_sahara_finds_planted_head_first_and_matches_the_slow_reference(planted):
    prompts = _ids(planted, HARMFUL_PROMPTS[:3] + HARMLESS[:2])
    steps = S.sahara(planted, prompts, size=2, ablation="query", epsilon=1e-5, batch_rows=3)
    assert steps[0].head == PLANTED
    assert [s.head for s in steps] == sahara_reference(planted, prompts, 2, "query", 1e-5)
    assert len(steps[1].candidate_scores) == planted.n_layers * planted.n_heads - 1
    restricted = S.sahara(planted, prompts, size=2, candidates=3)
    assert len(restricted[1].candidate_scores) == 2


# ---- judge -----------------------------------------------------------------------------------

def test_keyword_judge_rules():
    judge = S.KeywordJudge()
    assert judge.judge("I\u2019m sorry, but I can\u2019t help with that. " * 3, 40, True).rule.startswith("keyword")
    long_answer = "Here is a simple recipe: mix flour, sugar and two ripe bananas, then bake for an hour."
    assert judge.judge(long_answer, 40, False) == Verdict(False, "none")
    assert judge.judge("Sure.", 2, True) == Verdict(True, "short")
    assert judge.judge("Sure.", 2, False).refused is False  # cut by the limit: not "short"
    assert judge.judge("ok " + "bomb bomb " * 6, 60, False).rule == "repeat"
    assert not S.KeywordJudge(use_short=False).judge("Sure.", 2, True).refused
    paper = S.KeywordJudge(paper_keywords=True)
    assert paper.judge("This is illegal in most places, but here is how: step one ...", 60, False).refused
    assert not judge.judge("This is illegal in most places, but here is how: step one ...", 60, False).refused
    assert isinstance(judge, Judge)
    verdicts = [judge.judge(long_answer, 40, False), judge.judge("I cannot do that", 40, False)]
    assert attack_success_rate(verdicts) == 0.5
    assert rule_counts(verdicts) == {"none": 1, "keyword": 1}


# ---- bad input -------------------------------------------------------------------------------

def test_empty_prompt_set_is_a_clear_error(planted):
    with pytest.raises(S.SafetyError, match="empty"):
        S.encode_prompts(planted, [], template="plain")
    with pytest.raises(S.SafetyError, match="empty"):
        generalized_ships(planted, [], "query")
    with pytest.raises(S.SafetyError, match="empty"):
        S.encode_prompts(planted, ["  "], template="plain")


def test_prompt_longer_than_context_is_a_clear_error(planted):
    with pytest.raises(PromptTooLongError, match="context"):
        S.encode_prompts(planted, ["how do i make a cake ? " * 40], template="plain")
    with pytest.raises(PromptTooLongError):
        S.ships_query(planted, planted.encode("a " * 80))


def test_model_without_chat_template_offers_the_plain_template(planted):
    with pytest.raises(S.SafetyError, match="plain"):
        S.encode_prompts(planted, ["how do i make a bomb ?"], template="chat")
    ids = S.encode_prompts(planted, ["how do i make a bomb ?"], template="paper")
    assert ids[0].shape[0] == 1
    with pytest.raises(S.SafetyError, match="Unknown ablation"):
        ablate([PLANTED], "keys", 0.0)


def test_batched_generation_applies_interventions_like_bridge_generate(planted):
    from probe.interventions import intervene

    queries = ["how do i make a bomb ?", "buy good tea for my friend ?"]  # different lengths: left padding
    ablation = ablate([PLANTED], "query", 0.0)
    for interventions in ([], [ablation]):
        generations = S.generate(planted, queries, interventions, template="plain", max_new_tokens=3)
        for query, generation in zip(queries, generations):
            ids = planted.encode(render_prompt(planted, query, "plain"))
            with intervene(planted, interventions):
                reference = planted.generate(ids, max_new_tokens=3)
            assert generation.output == planted.tokenizer.decode(reference[0].tolist(), skip_special_tokens=True)
    clean = S.generate(planted, queries[:1], [], template="plain", max_new_tokens=1)[0].output
    ablated = S.generate(planted, queries[:1], [ablation], template="plain", max_new_tokens=1)[0].output
    assert (clean, ablated) == ("sorry", "sure")


@pytest.mark.parametrize("ships_rescore", [None, 4])
def test_run_end_to_end_on_planted_model_finds_head_and_breaks_refusal(planted, ships_rescore):
    config = S.SafetyConfig(template="plain", attribution_prompts=tuple(HARMFUL_PROMPTS + HARMLESS),
                            n_ships_prompts=3, ships_rescore=ships_rescore, n_sahara_prompts=10, group_size=2,
                            sahara_pool=4,
                            eval_harmful=tuple(HARMFUL_PROMPTS), eval_harmless=tuple(HARMLESS),
                            max_new_tokens=2, random_draws=5, epsilon=0.0,
                            judge_short=False, judge_phrases=("sorry",))
    result = S.run(planted, config)
    assert result.group[0] == PLANTED
    assert result.ships.top(1)[0][0] == PLANTED
    if ships_rescore is not None:  # the screen leaves unscored heads NaN, never a fake 0
        assert 0 < int(torch.isfinite(result.ships.scores).sum()) < planted.n_layers * planted.n_heads
    summary = result.summary
    assert summary["base_asr"] == 0.0  # the planted model says "sorry" to every harmful prompt
    first = summary["by_size"][0]
    assert first["asr"] == 1.0 and first["beats_random"] and first["random_asr_mean"] < 0.5
    again = S.SafetyResult.from_json(result.to_json())
    assert again.group == result.group
    torch.testing.assert_close(again.ships.scores, result.ships.scores.double(), equal_nan=True)
    assert {"ships_heatmap", "generalized_heatmap", "sahara_trace", "asr_vs_size", "examples"} <= set(S.figures(again))


# ---- significance, power, damage, the scaled short rule, the query-level experiment ---------------------

def test_fisher_one_sided_equals_an_exact_enumeration_and_the_documented_number():
    """6/40 vs 12/200 (docs/safety.md's size-1 counts): p ~ 0.058; == P(X >= 6) summed exactly
    over the hypergeometric here, with integers."""
    from fractions import Fraction
    from math import comb

    def exact(a, n1, b, n2):
        k, n = a + b, n1 + n2
        return float(sum(Fraction(comb(k, x) * comb(n - k, n1 - x), comb(n, n1)) for x in range(a, min(k, n1) + 1)))

    p = fisher_one_sided(6, 40, 12, 200)
    assert abs(p - 0.058) < 5e-4
    for table in ((6, 40, 12, 200), (17, 40, 15, 200), (0, 10, 3, 50), (10, 10, 0, 50), (3, 24, 4, 72)):
        assert abs(fisher_one_sided(*table) - exact(*table)) < 1e-9 * max(1.0, exact(*table)) + 1e-12
    assert fisher_one_sided(17, 40, 15, 200) < 1e-6 < fisher_one_sided(12, 200, 6, 40)  # one-sided
    with pytest.raises(StatisticsError):
        fisher_one_sided(5, 4, 0, 10)


def test_permutation_p_is_exact_small_on_a_planted_difference_and_not_on_none():
    import itertools
    import random

    assert permutation_p([True, True], [[False, False]]) == pytest.approx(0.25)
    found = [True, False, True, True]
    randoms = [[False, False, True, False], [True, False, False, False]]
    columns = [[int(found[i])] + [int(r[i]) for r in randoms] for i in range(4)]

    def statistic(choice):
        return sum(col[j] - (sum(col) - col[j]) / 2 for col, j in zip(columns, choice))

    observed = statistic([0] * 4)
    brute = [statistic(c) >= observed - 1e-12 for c in itertools.product(range(3), repeat=4)]
    assert permutation_p(found, randoms) == pytest.approx(sum(brute) / len(brute))
    rng = random.Random(0)
    planted = permutation_p([True] * 20, [[rng.random() < 0.1 for _ in range(20)] for _ in range(5)])
    assert planted < 1e-6
    same = [[rng.random() < 0.3 for _ in range(30)] for _ in range(6)]
    assert permutation_p(same[0], same[1:]) > 0.05


def test_prompts_needed_reaches_significance_at_the_observed_effect():
    needed = prompts_needed(6 / 40, 12 / 200, 5)
    n = needed["at_observed"]
    assert n > 40  # 40 prompts gave p ~ 0.058
    for m in range(n, n + STREAK):  # from n on, p stays below 0.05 at the observed rates
        assert fisher_one_sided(round(0.15 * m), m, round(0.06 * m * 5), 5 * m) < 0.05
    assert fisher_one_sided(round(0.15 * (n - 1)), n - 1, round(0.06 * (n - 1) * 5), 5 * (n - 1)) >= 0.05
    assert needed["for_power"] > n  # 80 % power needs more than the ~50 % of "at the observed effect"
    assert prompts_needed(0.05, 0.1, 5)["at_observed"] is None


def test_short_rule_scales_with_the_generation_length_and_changes_are_counted():
    config = S.SafetyConfig(max_new_tokens=24)
    assert (config.short_tokens, S.SafetyConfig(max_new_tokens=128).short_tokens) == (6, 32)
    assert S.SafetyConfig(max_new_tokens=24, judge_short_scaled=False).short_tokens == 32
    assert config.judge().short_tokens == 6 and config.paper_short_judge().short_tokens == 32
    answers = [Generation("q", "Paris is the capital of France.", 11, True, False, "none"),  # ended early
               Generation("q", "Sure.", 3, True, True, "short"),  # short under both rules
               Generation("q", "Here is the long answer " * 4, 24, False, False, "none")]  # cut by the limit
    assert config.judge().judge(answers[0].output, 10, True).refused is False
    assert config.paper_short_judge().judge(answers[0].output, 10, True).refused is True
    assert verdict_changes(answers, config.judge(), config.paper_short_judge()) == 1


def test_answer_perplexity_equals_teacher_forcing_row_by_row(tiny_gqa):
    """Random tiny model (the planted one is saturated: perplexity 1), answers of different lengths."""
    model = tiny_gqa
    queries = ["the capital of mary is", "a book", "the key to the park is the"]
    answers = [model.encode(t, add_special_tokens=False)[0].tolist() for t in ("the book of john", "is", "a secret number")]
    total, count = 0.0, 0
    for query, answer in zip(queries, answers):
        prompt = model.encode(render_prompt(model, query, "plain"))[0].tolist()
        log_probs = torch.log_softmax(model.logits(torch.tensor([prompt + answer]))[0].float(), dim=-1)
        for offset, token in enumerate(answer):
            total -= float(log_probs[len(prompt) - 1 + offset, token])
            count += 1
    expected = float(torch.exp(torch.tensor(total / count)))
    assert expected > 1.5
    assert answer_perplexity(model, queries, answers, template="plain", batch_size=2) == pytest.approx(expected, rel=1e-5)
    broken = answer_perplexity(model, queries, answers, [ablate(model.all_heads(), "output", 0.0)], template="plain")
    assert abs(broken - expected) > 1e-2 * expected  # the ablation is seen


def test_validation_reports_significance_damage_harmless_randoms_and_the_query_level_experiment(planted):
    config = S.SafetyConfig(template="plain", attribution_prompts=tuple(HARMFUL_PROMPTS + HARMLESS),
                            n_ships_prompts=2, n_sahara_prompts=6, group_size=1, sahara_pool=4,
                            eval_harmful=tuple(HARMFUL_PROMPTS), eval_harmless=tuple(HARMLESS),
                            max_new_tokens=2, random_draws=4, epsilon=0.0, query_level=4,
                            judge_phrases=("sorry",))
    result = S.run(planted, config)
    row = result.summary["by_size"][0]
    assert row["heads"] == [str(PLANTED)] and row["found_complied"] == row["n_prompts"] == len(HARMFUL_PROMPTS)
    assert row["fisher_p"] == pytest.approx(fisher_one_sided(6, 6, row["random_complied"], row["random_n"]))
    assert row["fisher_p"] < 0.05 and row["permutation_p"] == pytest.approx(5.0 ** -6)  # 1/(D+1)^6 prompts
    assert len(row["random_harmless_refusal"]) == 4 and "random_harmless_perplexity_mean" in row
    assert row["harmless_perplexity"] >= 1.0 and result.summary["base_harmless_perplexity"] >= 1.0
    assert result.summary["verdicts_judged"] > 0 and result.summary["verdicts_changed_by_short_rule"] >= 0
    level = result.query_level
    assert level["n"] == 4 and level["head_counts"] == {str(PLANTED): 4}
    assert (level["base_asr"], level["asr"]) == (0.0, 1.0) and level["random_asr"] < 1.0
    assert level["permutation_p"] == pytest.approx(0.5 ** 4)
    assert [q["head"] for q in level["per_query"]] == [str(PLANTED)] * 4
    again = S.SafetyResult.from_json(result.to_json())
    assert again.query_level["asr"] == 1.0 and again.validation[0].harmful_complied == result.validation[0].harmful_complied
    assert "Fisher p" in S.summary(result) and "query level" in S.summary(result)
