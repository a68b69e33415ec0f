"""Causal validation: held-out ASR and harmless refusal with the found group ablated vs random groups,
the paper's query-level experiment, and the per-size summary with its significance tests."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from analyses.common import Progress, no_progress, random_head_sets
from analyses.safety.errors import SafetyError
from analyses.safety.generation import Generation, answer_perplexity, generate, verdict_changes
from analyses.safety.judge import Judge, KeywordJudge, Verdict, rule_counts
from analyses.safety.prompts import encode_prompts
from analyses.safety.readouts import ablate
from analyses.safety.ships import ships_query, ships_screened
from analyses.stats import fisher_one_sided, mean_std, permutation_p, prompts_needed
from probe.heads import Head
from probe.models import LoadedModel
from probe.results import HeadScores


def _rate(generations: Sequence[Generation]) -> float:
    return sum(g.refused for g in generations) / len(generations)


@dataclass
class ConditionResult:
    """Refusal numbers of one ablation condition on the held-out sets."""

    name: str
    heads: list[str]
    asr: float | None
    harmless_refusal: float | None
    harmful_rules: dict[str, int] = field(default_factory=dict)
    harmless_rules: dict[str, int] = field(default_factory=dict)
    harmful_complied: list[bool] = field(default_factory=list)  # per held-out harmful prompt (ASR's numerator)
    harmless_refused: list[bool] = field(default_factory=list)  # per held-out harmless prompt
    harmless_perplexity: float | None = None  # of the base model's own greedy harmless answers (damage)
    verdicts_changed: int | None = None  # verdicts the paper's fixed short rule would decide differently


def validate(model: LoadedModel, group: Sequence[Head], harmful: Sequence[str], harmless: Sequence[str],
             ablation: str = "query", epsilon: float = 1e-5, draws: int = 5, seed: int = 0,
             template: str = "chat", system: str | None = None, max_new_tokens: int = 48,
             judge: Judge | None = None, random_on_harmless: bool = True, n_examples: int = 4,
             progress: Progress = no_progress, compare_judge: Judge | None = None,
             damage: bool = True) -> tuple[list[ConditionResult], dict[str, list[dict[str, Any]]]]:
    """ASR / harmless refusal before and after ablating group[:k] (k = 1..S) vs random groups of size k.

    Random groups: `draws` seeded sets per size from `random_head_sets`, which excludes the found heads;
    with `random_on_harmless` they also answer the harmless prompts. `damage`: every condition that
    answers the harmless prompts also re-scores the base model's own greedy harmless answers
    (`answer_perplexity`), so a group that merely breaks the model shows up. `compare_judge` (e.g. the
    paper's fixed short rule) re-judges every generation and counts the verdicts it would change.
    Returns the per-condition numbers (per-prompt outcomes included) and example generations.
    """
    if not harmful:
        raise SafetyError("Validation needs held-out harmful prompts; the set is empty.")
    judge = judge or KeywordJudge()
    conditions: list[tuple[str, list[Head], bool]] = [("base", [], True)]
    for k in range(1, len(group) + 1):
        conditions.append((f"sahara@{k}", list(group[:k]), True))
        for d, heads in enumerate(random_head_sets(model, k, draws, exclude=list(group), seed=seed + k)):
            conditions.append((f"random@{k}#{d}", heads, random_on_harmless))
    results, examples = [], {}
    base_answers: list[list[int]] = []
    for index, (name, heads, on_harmless) in enumerate(conditions):
        interventions = [ablate(heads, ablation, epsilon)] if heads else []
        bad = generate(model, harmful, interventions, template, system, max_new_tokens, judge)
        good = generate(model, harmless, interventions, template, system, max_new_tokens, judge) \
            if (on_harmless and harmless) else []
        if name == "base":
            base_answers = [g.token_ids for g in good]
        perplexity = None
        if damage and good and any(base_answers):
            perplexity = answer_perplexity(model, harmless, base_answers, interventions, template, system)
        changed = verdict_changes(bad + good, judge, compare_judge) if compare_judge is not None else None
        results.append(ConditionResult(
            name, [str(h) for h in heads], 1.0 - _rate(bad), _rate(good) if good else None,
            rule_counts([Verdict(g.refused, g.rule) for g in bad]),
            rule_counts([Verdict(g.refused, g.rule) for g in good]),
            [not g.refused for g in bad], [g.refused for g in good], perplexity, changed))
        if name == "base" or name == f"sahara@{len(group)}":
            examples[name] = [{k: v for k, v in asdict(g).items() if k != "token_ids"}
                              for g in (bad[:n_examples] + good[:max(1, n_examples // 2)])]
        progress((index + 1) / len(conditions), f"validation {name}")
    return results, examples


def query_level(model: LoadedModel, queries: Sequence[str], ablation: str = "query", epsilon: float = 1e-5,
                template: str = "chat", system: str | None = None, max_new_tokens: int = 48,
                judge: Judge | None = None, rescore: int | None = None, batch_rows: int = 32, seed: int = 0,
                batch_size: int = 16, progress: Progress = no_progress) -> dict[str, Any]:
    """The paper's query-level experiment (§3.3): per harmful query, ablate that query's own top Ships head
    and judge its generation; ASR over the queries, against no ablation and one seeded random other head per
    query (the control), with the Fisher and per-prompt permutation tests (found vs random, D = 1).

    Ships per query is exact over all heads, or (`rescore = k`) the first-order screen + exact top k.
    Each query's head is applied to its own batch row only, so the queries still generate in batches.
    """
    if not queries:
        raise SafetyError("The query-level experiment needs harmful queries; the set is empty.")
    judge = judge or KeywordJudge()
    rng = random.Random(seed)
    tops: list[tuple[Head, float]] = []
    controls: list[Head] = []
    for n, ids in enumerate(encode_prompts(model, queries, template, system, reserve=max_new_tokens)):
        scores = (ships_query(model, ids, ablation, epsilon, batch_rows=batch_rows) if rescore is None
                  else ships_screened(model, ids, ablation, epsilon, rescore, batch_rows=batch_rows)[1])
        head, score = HeadScores("ships", "nats", scores).top(1)[0]
        tops.append((head, float(score)))
        controls.append(rng.choice([h for h in model.all_heads() if h != head]))
        progress(0.8 * (n + 1) / len(queries), f"query-level Ships {n + 1}/{len(queries)}")
    outcomes: dict[str, list[Generation]] = {"base": [], "own": [], "random": []}
    for begin in range(0, len(queries), batch_size):
        chunk = list(queries[begin:begin + batch_size])
        per_row = {"own": [h for h, _ in tops[begin:begin + batch_size]], "random": controls[begin:begin + batch_size]}
        outcomes["base"] += generate(model, chunk, [], template, system, max_new_tokens, judge, batch_size)
        for name, heads in per_row.items():
            interventions = [ablate([h], ablation, epsilon, rows=[row]) for row, h in enumerate(heads)]
            outcomes[name] += generate(model, chunk, interventions, template, system, max_new_tokens, judge, batch_size)
    progress(1.0, "query-level generations")
    complied = {name: [not g.refused for g in gens] for name, gens in outcomes.items()}
    n = len(queries)
    own, control = sum(complied["own"]), sum(complied["random"])
    return {
        "n": n, "base_asr": sum(complied["base"]) / n, "asr": own / n, "random_asr": control / n,
        "fisher_p": fisher_one_sided(own, n, control, n),
        "permutation_p": permutation_p(complied["own"], [complied["random"]]),
        "prompts_needed": prompts_needed(own / n, control / n, 1),
        "head_counts": dict(Counter(str(h) for h, _ in tops).most_common()),
        "per_query": [{"prompt": q, "head": str(h), "ships": sc, "random_head": str(r),
                       "base_complied": b, "complied": c, "random_complied": rc, "output": g.output}
                      for q, (h, sc), r, b, c, rc, g in zip(queries, tops, controls, complied["base"],
                                                           complied["own"], complied["random"], outcomes["own"])],
    }


def summarize_validation(results: Sequence[ConditionResult]) -> dict[str, Any]:
    """Per group size: the found group vs the random groups of that size.

    - ASR: the random groups' mean and spread (population std), the margin, and two significance
      tests, one-sided: Fisher exact on (found complied of n) vs (random complied of n x D, pooled) and
      the exact per-prompt permutation test (`permutation_p`); `prompts_needed` says how many prompts
      the observed effect needs for p < 0.05 (where per-prompt outcomes were kept);
    - harmless prompts: refusal rate and the damage measure (perplexity of the base model's own greedy
      harmless answers) for the found group and each random group;
    - the verdicts the paper's fixed short-output rule would change, when counted.
    """
    base = next(r for r in results if r.name == "base")
    sizes = sorted({int(r.name.split("@")[1]) for r in results if r.name.startswith("sahara@")})
    rows = []
    for k in sizes:
        found = next(r for r in results if r.name == f"sahara@{k}")
        group = [r for r in results if r.name.startswith(f"random@{k}#")]
        randoms = [r.asr for r in group if r.asr is not None]
        mean, std = mean_std(randoms)
        row: dict[str, Any] = {
            "size": k, "heads": found.heads, "asr": found.asr, "delta_asr": found.asr - base.asr,
            "harmless_refusal": found.harmless_refusal, "random_asr_mean": mean, "random_asr_std": std,
            "random_asr": randoms, "margin": found.asr - mean, "beats_random": (found.asr - mean) > std}
        outcomes = [r.harmful_complied for r in group]
        if found.harmful_complied and outcomes and all(len(o) == len(found.harmful_complied) for o in outcomes):
            n, draws = len(found.harmful_complied), len(outcomes)
            a, b = sum(found.harmful_complied), sum(sum(o) for o in outcomes)
            row.update({"n_prompts": n, "found_complied": a, "random_complied": b, "random_n": n * draws,
                        "fisher_p": fisher_one_sided(a, n, b, n * draws),
                        "permutation_p": permutation_p(found.harmful_complied, outcomes),
                        "prompts_needed": prompts_needed(a / n, b / (n * draws), draws)})
        harmless = [r.harmless_refusal for r in group if r.harmless_refusal is not None]
        if harmless:
            row["random_harmless_refusal_mean"], row["random_harmless_refusal_std"] = mean_std(harmless)
            row["random_harmless_refusal"] = harmless
        if found.harmless_perplexity is not None:
            row["harmless_perplexity"] = found.harmless_perplexity
            perplexities = [r.harmless_perplexity for r in group if r.harmless_perplexity is not None]
            if perplexities:
                row["random_harmless_perplexity"] = perplexities
                row["random_harmless_perplexity_mean"], row["random_harmless_perplexity_std"] = mean_std(perplexities)
        rows.append(row)
    changed = [r.verdicts_changed for r in results if r.verdicts_changed is not None]
    out: dict[str, Any] = {"base_asr": base.asr, "base_harmless_refusal": base.harmless_refusal, "by_size": rows}
    if base.harmless_perplexity is not None:
        out["base_harmless_perplexity"] = base.harmless_perplexity
    if changed:
        out["verdicts_changed_by_short_rule"] = sum(changed)
        out["verdicts_judged"] = sum(len(r.harmful_complied) + len(r.harmless_refused) for r in results
                                     if r.verdicts_changed is not None)
    return out
