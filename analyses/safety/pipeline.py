"""The analyzer's run: Ships (query level), then Sahara (dataset level), then validation, on one model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from analyses.common import Progress, no_progress, provenance
from analyses.safety.config import SafetyConfig
from analyses.safety.dataset_level import SaharaStep, dataset_states, sahara, subspace_angle
from analyses.safety.errors import SafetyError
from analyses.safety.judge import Judge
from analyses.safety.prompts import encode_prompts, render_prompt
from analyses.safety.readouts import ABLATIONS
from analyses.safety.result import SafetyResult
from analyses.safety.ships import ships_query, ships_screened
from analyses.safety.validation import ConditionResult, query_level, summarize_validation, validate
from probe.heads import Head
from probe.models import LoadedModel
from probe.results import HeadScores

ANALYZER = "safety"
VERSION = "1"


def _default_prompts(config: SafetyConfig) -> tuple[list[str], list[str], list[str]]:
    """The configured prompt sets; the StrongREJECT split (a fetched asset) is read only when one is missing."""
    from analyses.data.strongreject import harmful_split, harmless_split

    needs_harmful = config.attribution_prompts is None or config.eval_harmful is None
    train, held = harmful_split(config.held_out, config.seed) if needs_harmful else ([], [])
    attribution = list(config.attribution_prompts) if config.attribution_prompts is not None else train
    harmful = list(config.eval_harmful) if config.eval_harmful is not None else held
    harmless = (list(config.eval_harmless) if config.eval_harmless is not None
                else harmless_split(config.held_out, config.seed)[1])
    return attribution, harmful[: config.n_eval_harmful], harmless[: config.n_eval_harmless]


def run(model: LoadedModel, config: SafetyConfig = SafetyConfig(), progress: Progress | None = None,
        judge: Judge | None = None) -> SafetyResult:
    """Ships (query level) → Sahara (dataset level) → validation, on one model.

    `judge` replaces the keyword judge built from the config (e.g. a classifier model).
    """
    say = progress or no_progress
    if config.ablation not in ABLATIONS:
        raise SafetyError(f"Unknown ablation {config.ablation!r}; choose query (UA) or output (SC).")
    attribution, harmful, harmless = _default_prompts(config)
    if not attribution:
        raise SafetyError("The attribution prompt set is empty.")
    timings: dict[str, float] = {}
    ships_ids = encode_prompts(model, attribution[: config.n_ships_prompts], config.template, config.system_prompt)
    sahara_ids = encode_prompts(model, attribution[: config.n_sahara_prompts], config.template, config.system_prompt)
    started = time.perf_counter()
    per_prompt = []
    for n, ids in enumerate(ships_ids):
        if config.ships_rescore is None:
            per_prompt.append(ships_query(model, ids, config.ablation, config.epsilon, batch_rows=config.batch_rows))
        else:  # heads the screen did not pass on stay NaN (not scored), never 0
            per_prompt.append(ships_screened(model, ids, config.ablation, config.epsilon, config.ships_rescore,
                                             batch_rows=config.batch_rows)[1])
        say(0.3 * (n + 1) / len(ships_ids), f"Ships prompt {n + 1}/{len(ships_ids)}")
    ships_mean = torch.stack(per_prompt).nanmean(0)
    timings["ships"] = time.perf_counter() - started
    prov = provenance(model, ANALYZER, VERSION, config,
                      {"attribution": attribution[: max(config.n_ships_prompts, config.n_sahara_prompts)],
                       "harmful": harmful, "harmless": harmless}, config.seed)
    ships = HeadScores("ships", "nats", ships_mean, prov,
                       f"mean KL(p_base || p_ablated) at the last prompt position, {ABLATIONS[config.ablation]}, "
                       f"eps={config.epsilon:g}, over {len(ships_ids)} prompts"
                       + ("" if config.ships_rescore is None else
                          f"; exact for the {config.ships_rescore} heads a first-order screen ranked best per "
                          "prompt, NaN for the rest"))
    started = time.perf_counter()
    steps = _sahara_on_pool(model, sahara_ids, config, ships, say)
    timings["sahara"] = time.perf_counter() - started
    generalized = torch.full((model.n_layers, model.n_heads), float("nan"))
    for name, score in steps[0].candidate_scores.items():
        head = Head.parse(name)
        generalized[head.layer, head.head] = score
    generalized_scores = HeadScores("generalized_ships", "degrees", generalized, prov,
                                    "angle between top left singular vectors, base vs one head ablated")
    validation: list[ConditionResult] = []
    summary: dict[str, Any] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    if config.validate:
        started = time.perf_counter()
        validation, examples = validate(
            model, [s.head for s in steps], harmful, harmless, config.ablation, config.epsilon,
            config.random_draws, config.seed, config.template, config.system_prompt, config.max_new_tokens,
            judge=judge or config.judge(), random_on_harmless=config.random_on_harmless,
            compare_judge=None if judge is not None or not config.judge_short else config.paper_short_judge(),
            damage=config.damage,
            progress=lambda f, m: say(0.6 + 0.4 * f, m))
        summary = summarize_validation(validation)
        timings["validation"] = time.perf_counter() - started
    queries: dict[str, Any] = {}
    if config.query_level:
        started = time.perf_counter()
        queries = query_level(model, harmful[: config.query_level], config.ablation, config.epsilon, config.template,
                              config.system_prompt, config.max_new_tokens, judge or config.judge(),
                              config.ships_rescore, config.batch_rows, config.seed)
        timings["query_level"] = time.perf_counter() - started
    top = [{"prompt": q, "top": [(str(h), s) for h, s in HeadScores("s", "nats", scores).top(5)]}
           for q, scores in zip(attribution, per_prompt)]
    return SafetyResult(ships, generalized_scores, steps, validation, summary, examples,
                        render_prompt(model, attribution[0], config.template, config.system_prompt), top,
                        timings, prov, queries)


def _sahara_on_pool(model: LoadedModel, prompts: Sequence[torch.Tensor], config: SafetyConfig,
                    ships: HeadScores, say: Progress) -> list[SaharaStep]:
    """Sahara over all heads, or (sahara_pool = k) over the k heads with the highest query-level Ships.

    The pool is a cheap screen; every score inside it is the exact dataset-level angle.
    """
    if config.sahara_pool is None:
        return sahara(model, prompts, config.group_size, config.ablation, config.epsilon, config.r_main,
                      config.center, None, config.batch_rows, progress=lambda f, m: say(0.3 + 0.3 * f, m))
    pool = [h for h, _ in ships.top(max(config.sahara_pool, config.group_size))]
    group: list[Head] = []
    steps: list[SaharaStep] = []
    for step in range(config.group_size):
        options = [h for h in pool if h not in group]
        base, ablated = dataset_states(model, prompts, [group + [h] for h in options], config.ablation,
                                       config.epsilon, config.batch_rows)
        angles = subspace_angle(base, ablated, config.r_main, config.center)
        best = int(torch.argmax(angles))
        group.append(options[best])
        steps.append(SaharaStep(options[best], float(angles[best]),
                                {str(h): float(a) for h, a in zip(options, angles)}))
        say(0.3 + 0.3 * (step + 1) / config.group_size, f"Sahara step {step + 1}: {options[best]}")
    return steps
