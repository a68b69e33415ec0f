"""The fair circuit-discovery comparison: EAP / EAP-IG against exact patching, the MIB area metrics,
every method on the planted circuit, and held-out prompts enforced (analyses/cdt/baselines.py, method_comparison.py)."""

from __future__ import annotations

import pytest
import torch

from analyses.cdt import baselines, circuits, method_comparison
from analyses.planted.induction import PLANTED, induction_batch, planted_induction_model
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.interventions import capture_z, intervene, mean_ablation, resample_ablation

INDUCTION = Head(1, 0)  # last layer: its z reaches the metric only through W_O, the final norm and W_U


@pytest.fixture(scope="module")
def planted():
    return planted_induction_model()


@pytest.fixture(scope="module")
def batch(planted):
    return induction_batch(planted, n=6, seed=3)


def _identity_final_norm(model):
    """Hooks that make the final norm the identity: everything after a last-layer head's z is then linear."""
    box = {}

    def keep(x, hook):
        box["x"] = x

    def replace(x, hook):
        return box["x"]

    return model.hooks([("ln_final.hook_in", keep), ("ln_final.hook_out", replace)])


def _metric(model, batch: LogitDiffBatch, ops=()) -> float:
    with intervene(model, list(ops)):
        logits = model.logits(batch.ids)[:, -1]
    rows = torch.arange(batch.n_prompts)
    return float((logits[rows, batch.good] - logits[rows, batch.bad]).mean())


def test_eap_equals_the_exact_patching_effect_when_the_metric_is_linear_in_z(planted, batch):
    mu = circuits.batch_means(planted, batch)
    with _identity_final_norm(planted):
        eap = baselines.attribution_scores(planted, [batch], steps=1, corrupt="mean", means=[mu])
        exact = _metric(planted, batch, [mean_ablation([INDUCTION], mu)]) - _metric(planted, batch)
    assert abs(exact) > 1.0  # the head matters
    assert float(eap[1, 0]) == pytest.approx(exact, rel=1e-4, abs=1e-4)
    # with the real (nonlinear) final norm the first-order estimate is off
    eap_real = baselines.attribution_scores(planted, [batch], steps=1, corrupt="mean", means=[mu])
    exact_real = _metric(planted, batch, [mean_ablation([INDUCTION], mu)]) - _metric(planted, batch)
    assert abs(float(eap_real[1, 0]) - exact_real) > 0.05 * abs(exact_real)


def test_eap_ig_is_exact_when_linear_along_the_path_and_differs_from_eap_when_not(planted, batch):
    cf = baselines.counterfactual_ids(batch)
    cf_z = capture_z(planted, cf, [INDUCTION])

    def exact() -> float:  # patch the head's z with its counterfactual value, per prompt
        return _metric(planted, batch, [resample_ablation([INDUCTION], cf_z)]) - _metric(planted, batch)

    with _identity_final_norm(planted):  # ∂m/∂z of the head is then the same at every path point
        ig = baselines.attribution_scores(planted, [batch], steps=5, corrupt="counterfactual")
        eap = baselines.attribution_scores(planted, [batch], steps=1, corrupt="counterfactual")
        linear_exact = exact()
    assert abs(linear_exact) > 1.0
    assert float(ig[1, 0]) == pytest.approx(linear_exact, rel=1e-4, abs=1e-4)
    assert float(eap[1, 0]) == pytest.approx(linear_exact, rel=1e-4, abs=1e-4)
    # the real final norm: the gradient changes along the path, so the K-point average is not EAP's
    ig = baselines.attribution_scores(planted, [batch], steps=5, corrupt="counterfactual")
    eap = baselines.attribution_scores(planted, [batch], steps=1, corrupt="counterfactual")
    assert abs(float(ig[1, 0]) - float(eap[1, 0])) > 0.05 * abs(float(eap[1, 0]))
    assert abs(float(ig[1, 0]) - exact()) < abs(float(eap[1, 0]) - exact())  # and IG is closer to the truth
    with pytest.raises(baselines.CDTError, match="counterfactual"):
        baselines.attribution_scores(planted, [batch], steps=5, corrupt="mean")


def test_cpr_and_cmd_are_the_hand_computed_trapezoids():
    xs = [0.1, 0.5, 1.0]
    f = [0.2, 1.4, 1.0]
    # CPR: 0.4 * (0.2 + 1.4) / 2 + 0.5 * (1.4 + 1.0) / 2 = 0.32 + 0.6
    assert baselines.cpr(xs, f) == pytest.approx(0.92)
    # CMD: |1 - f| = 0.8, 0.4, 0.0 → 0.4 * 1.2 / 2 + 0.5 * 0.4 / 2 = 0.24 + 0.1
    assert baselines.cmd(xs, f) == pytest.approx(0.34)
    assert baselines.cpr([1.0, 0.0], [1.0, 0.0]) == pytest.approx(0.5)  # order of the points does not matter
    assert baselines.sizes_for(270) == [1, 1, 2, 3, 6, 14, 27, 54, 135, 270]  # fractions of heads, rounded up
    with pytest.raises(baselines.CDTError):
        baselines.cpr([0.5], [1.0])


@pytest.mark.parametrize("method", method_comparison.METHODS)
def test_every_method_finds_the_planted_heads_by_ranking_alone(planted, method):
    config = method_comparison.MethodComparisonConfig(tasks=("planted-induction",), per_iteration=1, max_heads=2)
    discovery, _ = method_comparison.task_prompts(planted, "planted-induction", config)
    means = [circuits.batch_means(planted, b) for b in discovery]
    scorer = method_comparison.scorer(planted, method, discovery, config, means)
    circuit, seconds = method_comparison.discover(planted, scorer, "rank", config, None)
    assert circuit.heads == [Head(1, 0), Head(0, 0)] and set(circuit.heads) == set(PLANTED)
    assert seconds > 0
    if method in ("eap", "eap-ig"):  # node scores: the third head need not be upstream of the second
        more = method_comparison.MethodComparisonConfig(tasks=("planted-induction",), per_iteration=1, max_heads=3)
        scorer = method_comparison.scorer(planted, method, discovery, more, means)
        circuit, _ = method_comparison.discover(planted, scorer, "rank", more, None)
        assert len(circuit.heads) == 3


def test_the_comparison_runs_and_evaluation_is_held_out(planted):
    config = method_comparison.MethodComparisonConfig(tasks=("planted-induction",), per_iteration=1, max_heads=2,
                                                      random_draws=2)
    result = method_comparison.compare_methods(planted, config)
    r = method_comparison.MethodComparisonResult.from_json(result.to_json()).tasks["planted-induction"]
    assert not set(r["discovery_texts"]) & set(r["evaluation_texts"])
    assert r["sizes"] == [1, 1, 1, 1, 1, 1, 1, 2, 4, 8]
    for method in method_comparison.METHODS:
        for level in method_comparison.LEVELS:
            cell = r["methods"][method][level]
            assert cell["faithfulness"][7] > 0.9 and cell["faithfulness"][-1] == pytest.approx(1.0)
            assert cell["cpr"] == pytest.approx(baselines.cpr(r["fractions"], cell["faithfulness"]))
    assert r["random"]["cpr_mean"] < r["methods"]["cd-t"]["rank"]["cpr"]
    assert "| cd-t | rank |" in method_comparison.table(result)


def test_shared_discovery_and_evaluation_prompts_are_refused(planted):
    one = induction_batch(planted, n=4, seed=0)
    other = induction_batch(planted, n=4, seed=99)
    method_comparison.require_disjoint([one], [other])
    with pytest.raises(method_comparison.OverlapError, match="held out"):
        method_comparison.require_disjoint([one], [other, one])
    assert method_comparison.without_texts([other, one], set(one.texts)) == [other]
    with pytest.raises(method_comparison.OverlapError, match="both discovery and evaluation"):
        method_comparison.task_prompts(planted, "successor", method_comparison.MethodComparisonConfig(
            successor_discovery_templates=(0, 1), successor_evaluation_templates=(1,)))


def _directional(model, batch: LogitDiffBatch, head: Head, direction: torch.Tensor, embed=None,
                 eps: float = 2e-3) -> float:
    """Central finite difference of the mean metric along `direction` (added to the head's z), with the
    token embeddings optionally replaced by `embed`: an oracle of ∂m/∂z · direction from forwards only."""
    values = []
    for sign in (1.0, -1.0):
        def on_z(z, hook, sign=sign):
            z = z.clone()
            z[:, :, head.head] += sign * eps * direction.to(z.dtype)
            return z
        hooks = [(f"blocks.{head.layer}.attn.hook_z", on_z)]
        if embed is not None:
            hooks.append((baselines.EMBED_HOOK, lambda e, hook: embed.to(e.dtype)))
        with model.hooks(hooks):
            values.append(_metric(model, batch))
    return (values[0] - values[1]) / (2 * eps)


def test_scores_match_finite_differences_through_later_layers_and_along_the_path(planted, batch):
    """EAP of the previous-token head (its effect runs through the induction head's keys: the total
    derivative) and EAP-IG's K-point average, both against forward-only finite differences."""
    mu = circuits.batch_means(planted, batch)
    eap = baselines.attribution_scores(planted, [batch], steps=1, corrupt="mean", means=[mu])
    ig = baselines.attribution_scores(planted, [batch], steps=5, corrupt="counterfactual")
    cf = baselines.counterfactual_ids(batch)
    _, clean = planted.run_with_cache(batch.ids, names_filter=lambda n: n == baselines.EMBED_HOOK)
    _, counter = planted.run_with_cache(cf, names_filter=lambda n: n == baselines.EMBED_HOOK)
    e, e_cf = clean[baselines.EMBED_HOOK], counter[baselines.EMBED_HOOK]
    for head in (Head(0, 0), Head(1, 0)):
        z = capture_z(planted, batch.ids, [head])[head]
        expected = _directional(planted, batch, head, mu[head][None] - z)
        assert abs(expected) > 0.3
        assert float(eap[head.layer, head.head]) == pytest.approx(expected, rel=0.02)
        d = capture_z(planted, cf, [head])[head] - z
        points = [_directional(planted, batch, head, d, e_cf + k / 5 * (e - e_cf)) for k in range(1, 6)]
        assert float(ig[head.layer, head.head]) == pytest.approx(sum(points) / 5, rel=0.02)


def test_the_docs_table_and_numbers_are_the_committed_result_file():
    """docs/cdt.md's comparison table is `method_comparison.table` of the committed result, and its prose numbers
    are read from the file by key path."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    data = json.loads((root / "docs/results/cdt_compare_smollm2_small.json").read_text())
    doc = (root / "docs/cdt.md").read_text()
    assert method_comparison.table(method_comparison.MethodComparisonResult.from_json(data)) in doc
    ioi, succ = data["tasks"]["ioi"], data["tasks"]["successor"]
    for value, text in [
        (ioi["evaluation_accuracy"]["top1_accuracy"], "IOI top-1 {:.3f}"),
        (ioi["full_metric"], "full {:.3f}"), (ioi["empty_metric"], "all ablated {:.3f}"),
        (succ["full_metric"], "full {:.3f}"), (succ["empty_metric"], "all ablated {:.3f}"),
        (ioi["random"]["cpr_mean"], "CPR {:.3f} ±"), (succ["methods"]["cd-t"]["rank"]["cpr"], "(0.977 at"),
        (succ["methods"]["eap"]["rank"]["cmd"], "EAP wins CMD** ({:.3f}"),
        (data["machine"]["ioi"]["total_seconds"], "in {:,.0f} s of wall time"),
    ]:
        expected = text.format(value).replace("-", "−") if "{" in text else text
        assert expected in doc.replace("-", "−"), expected
    assert ioi["winners"]["any"] == ["eap-ig/prune", "eap-ig/prune"]  # "IOI: EAP-IG wins"
    assert succ["winners"]["any"] == ["cd-t/rank", "eap/prune+refill"]  # CD-T by CPR, EAP by CMD
