"""The factual analysis end to end: known capitals, disjoint splits, baseline behaviour, attribution,
the scaling search, its held-out check and the causal checks."""

from __future__ import annotations

from typing import Any

import torch

from analyses.common import Progress, no_progress, provenance
from analyses.data.counterfactual import CounterfactualDataError, build_counterfactuals, split_countries
from analyses.factual.attribution import head_attribution
from analyses.factual.behaviour import _known_countries, fast_rates, generation_rates
from analyses.factual.causal import causal_checks
from analyses.factual.config import ANALYZER, VERSION, FactualConfig, FactualError, FactualResult
from analyses.factual.prompts import _pool, check_disjoint
from analyses.factual.rates import FastRates
from analyses.factual.steering import best_point, scale_sweep
from probe.heads import Head
from probe.interventions import scale
from probe.models import LoadedModel
from probe.results import HeadScores


def run(model: LoadedModel, config: FactualConfig = FactualConfig(), progress: Progress | None = None) -> FactualResult:
    """The whole analysis (see the `analyses.factual` docstring); pure: no printing, no Streamlit."""
    say = progress or no_progress
    config.validate(model)
    notes: list[str] = []
    formatter = model.chat_prompt if config.template == "chat" else None
    pool = _pool(config)
    if len(pool) < 4:
        raise FactualError(f"Need at least 4 countries, got {len(pool)}.")

    say(0.0, "no-context questions: which capitals does the model know?")
    usable, known = _known_countries(model, pool, config, formatter)
    if len(usable) < 2:
        raise FactualError(f"{model.spec} answers only {len(usable)} of {len(pool)} capitals without context; "
                           "set known_only=False to study it anyway.")
    tuning_countries, heldout_countries = split_countries(usable, config.tuning_fraction, config.seed)
    try:
        tuning = build_counterfactuals(model.tokenizer, tuning_countries, config.n_tuning, config.seed,
                                       config.template, formatter, context_pool=pool)
        heldout = build_counterfactuals(model.tokenizer, heldout_countries, config.n_heldout, config.seed + 1,
                                        config.template, formatter, context_pool=pool)
    except CounterfactualDataError as error:
        raise FactualError(str(error)) from error
    check_disjoint(tuning.prompts, heldout.prompts)
    data = {"tuning": tuning.notes(), "heldout": heldout.notes(),
            "n_tuning_countries": len(tuning_countries), "n_heldout_countries": len(heldout_countries),
            "first_token_rule": "plain: first token of ' ' + city; chat: first token of the bare city"}
    for name, split in (("tuning", tuning), ("held-out", heldout)):
        if split.n_multi_token:
            notes.append(f"{split.n_multi_token} of {len(split.prompts)} {name} prompts have a multi-token answer: "
                         "logit measures use its first token only.")

    say(0.1, "baseline behaviour on the held-out split")
    baseline = {"generation": generation_rates(model, heldout.prompts, config).to_json(),
                "fast": fast_rates(model, heldout.prompts, None, config.batch_size).to_json(),
                "tuning_fast": fast_rates(model, tuning.prompts, None, config.batch_size).to_json()}

    say(0.2, "head attribution on the tuning split")
    attribution = head_attribution(model, tuning.prompts, config.batch_size)
    mean = attribution.mean
    prov = provenance(model, ANALYZER, VERSION, config,
                      {"tuning": [p.text for p in tuning.prompts], "heldout": [p.text for p in heldout.prompts]},
                      config.seed)
    scores = HeadScores("factual_dla", "logit(in-context) - logit(memorised), direct, per head",
                        mean.to(torch.float32), prov,
                        "Mean direct logit attribution at the last position over the tuning prompts; "
                        "> 0 promotes the context city (in-context head), < 0 the true capital (memory head).")
    k = config.candidates_per_direction
    top_ic = [(str(h), s) for h, s in scores.top(k, largest=True) if s > 0]
    top_mem = [(str(h), s) for h, s in scores.top(k, largest=False) if s < 0]
    candidates = list(dict.fromkeys(Head.parse(h) for h, _ in top_ic + top_mem))
    if not candidates:
        raise FactualError("Every head's attribution is zero: nothing to steer (is the model degenerate?).")

    say(0.3, "scaling search on the tuning split (fast measure)")
    sweep = scale_sweep(model, tuning.prompts, candidates, config.factors, config.component, config.batch_size,
                        lambda f, m: say(0.3 + 0.3 * f, m))
    best: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for index, direction in enumerate(("in_context", "memorised")):
        point = best_point(sweep, direction)
        head = Head.parse(point.head)
        say(0.6 + 0.1 * index, f"held-out check of {head} x{point.factor:g} ({direction})")
        intervention = scale([head], config.component, point.factor)
        best[direction] = {"head": point.head, "factor": point.factor, "tuning_fast": point.fast.to_json(),
                           "heldout_fast": fast_rates(model, heldout.prompts, intervention,
                                                      config.batch_size).to_json(),
                           "heldout_generation": generation_rates(model, heldout.prompts, config,
                                                                  intervention).to_json()}
        if point.head not in curves:
            curve = {"fast": [], "generation": []}
            for factor in config.factors:
                move = scale([head], config.component, factor)
                curve["fast"].append(fast_rates(model, heldout.prompts, move, config.batch_size).to_json())
                if config.generate_curves:
                    curve["generation"].append(generation_rates(model, heldout.prompts, config, move).to_json())
            curves[point.head] = {"factors": list(config.factors), **curve}

    say(0.85, "causal checks against random heads")
    causal = causal_checks(model, heldout.prompts, tuning=tuning.prompts,
                           top_ic_heads=[h for h, _ in scores.top(config.ablate_top_k, True)],
                           top_mem_heads=[h for h, _ in scores.top(config.ablate_top_k, False)],
                           best=best, config=config, baseline=FastRates.from_json(baseline["fast"]))
    say(1.0, "done")
    return FactualResult(scores=scores, provenance=prov, data=data, known=known, baseline=baseline,
                         top_in_context=top_ic, top_memory=top_mem,
                         sweep=[{"head": p.head, "factor": p.factor, **p.fast.to_json()} for p in sweep],
                         best=best, curves=curves, causal=causal, notes=notes)
