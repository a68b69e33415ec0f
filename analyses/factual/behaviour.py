"""The model's behaviour on the prompts, with or without interventions: greedy answers and their
rates, the first-token logits and their rates, and which capitals it knows without context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from analyses.data.capitals import Capital
from analyses.data.counterfactual import CounterfactualPrompt, build_plain
from analyses.factual.config import FactualConfig, FactualError
from analyses.factual.prompts import _groups
from analyses.factual.rates import FastRates, Rates, classify_answer, rates_from_labels
from analyses.stats import cluster_bootstrap_interval
from probe import batching
from probe.generation import greedy_generate
from probe.interventions import Intervention, intervene
from probe.models import LoadedModel
from probe.prompting import stop_ids


def _as_list(interventions: Intervention | Sequence[Intervention] | None) -> list[Intervention]:
    if interventions is None:
        return []
    return [interventions] if isinstance(interventions, Intervention) else list(interventions)


@torch.no_grad()
def generate_answers(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], max_new_tokens: int = 16,
                     interventions: Intervention | Sequence[Intervention] | None = None,
                     batch_size: int = 32) -> list[str]:
    """Greedy continuations through probe's one generation path (`probe.generation.greedy_generate`:
    KV cache, interventions active at every step), cut at the end-of-text token.

    Batches hold prompts of one token length, so no row is padded: each is computed as it is alone."""
    answers = [""] * len(prompts)
    eos = model.tokenizer.eos_token_id
    stops = stop_ids(model, "eos")
    def one(indices: list[int], ids: torch.Tensor) -> None:  # out-of-memory: batching halves the batch
        with intervene(model, _as_list(interventions)):
            rows = greedy_generate(model, [prompts[i].text for i in indices], max_new_tokens,
                                   batch_size=len(indices), add_special_tokens=True, stop_ids=stops)
        for index, new in zip(indices, rows):
            answers[index] = model.decode(new[:new.index(eos)] if eos is not None and eos in new else new)

    for indices, ids in _groups(prompts, model, batch_size):
        model.check_fits(ids.shape[-1] + max_new_tokens)
        batching.split_on_oom(one, indices, ids, what="factual generation")
    return answers


def generation_rates(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], config: FactualConfig,
                     interventions: Intervention | Sequence[Intervention] | None = None) -> Rates:
    answers = generate_answers(model, prompts, config.max_new_tokens, interventions, config.batch_size)
    labels = [classify_answer(a, p.capital_names, p.context_city) for a, p in zip(answers, prompts)]
    return rates_from_labels(labels, answers, [p.country for p in prompts], config.seed)


@torch.no_grad()
def first_token_logits(model: LoadedModel, prompts: Sequence[CounterfactualPrompt],
                       interventions: Intervention | Sequence[Intervention] | None = None,
                       batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: (logit of in-context first token, logit of memorised first token) `[n, 2]`, and argmax `[n]`."""
    pair = torch.zeros(len(prompts), 2, dtype=torch.float64)
    argmax = torch.zeros(len(prompts), dtype=torch.long)
    def one(indices: list[int], ids: torch.Tensor) -> None:  # out-of-memory: batching halves the batch
        with intervene(model, _as_list(interventions)):
            last = model.logits(ids, positions="last")[:, -1].to(torch.float64)
        for row, index in enumerate(indices):
            p = prompts[index]
            pair[index, 0] = last[row, p.in_context_token] if p.in_context_token >= 0 else float("nan")
            pair[index, 1] = last[row, p.memorised_token]
        argmax[indices] = last.argmax(-1).cpu()

    for indices, ids in _groups(prompts, model, batch_size):
        batching.split_on_oom(one, indices, ids, what="factual first-token logits")
    return pair, argmax


def fast_rates(model: LoadedModel, prompts: Sequence[CounterfactualPrompt],
               interventions: Intervention | Sequence[Intervention] | None = None,
               batch_size: int = 32, seed: int = 0) -> FastRates:
    """The first-token measure, with 95% cluster-bootstrap intervals over the prompts' countries."""
    pair, argmax = first_token_logits(model, prompts, interventions, batch_size)
    diff = pair[:, 0] - pair[:, 1]
    ic = torch.tensor([p.in_context_token for p in prompts])
    mem = torch.tensor([p.memorised_token for p in prompts])
    countries = [p.country for p in prompts]
    intervals: dict[str, list[float]] = {}
    if len(set(countries)) >= 2:
        for name, values in (("mean_logit_diff", diff), ("prefers_in_context", (diff > 0).double())):
            intervals[name] = list(cluster_bootstrap_interval(values.tolist(), countries, seed=seed))
    return FastRates(len(prompts), float(diff.mean()), float((diff > 0).double().mean()),
                     float((argmax == ic).double().mean()), float((argmax == mem).double().mean()), intervals)


def _known_countries(model: LoadedModel, pool: Sequence[Capital], config: FactualConfig,
                     formatter: Callable[[str], str] | None) -> tuple[list[Capital], dict[str, Any]]:
    """No-context generation per country; keep the ones answered with the true capital."""
    plain = build_plain(model.tokenizer, pool, config.template, formatter)
    if not plain.prompts:
        raise FactualError("No country's capital is known to the tokenizer.")
    answers = generate_answers(model, plain.prompts, config.max_new_tokens, None, config.batch_size)
    labels = [classify_answer(a, p.capital_names, "") for a, p in zip(answers, plain.prompts)]
    known = {p.country for p, label in zip(plain.prompts, labels) if label == "memorised"}
    rates = rates_from_labels(labels, answers)
    info = {"n_countries": len(plain.prompts), "n_known": len(known),
            "accuracy": rates.rate("memorised"), "interval": list(rates.interval("memorised")),
            "unknown_token": plain.dropped_unknown_token,
            "known_countries": sorted(known)}
    if not config.known_only:
        return [c for c in pool if c.capital not in plain.dropped_unknown_token], info
    return [c for c in pool if c.country in known], info
