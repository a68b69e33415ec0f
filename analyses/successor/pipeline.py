"""The successor analysis end to end: tasks, effective embeddings, every head's score, then the
probe, the arithmetic and the causal check as configured."""

from __future__ import annotations

import torch

from analyses.common import Progress, no_progress, provenance
from analyses.data.succession import build_tasks
from analyses.successor.arithmetic import vector_arithmetic
from analyses.successor.causal import causal_check
from analyses.successor.config import ANALYZER, VERSION, SuccessorConfig, SuccessorError, SuccessorResult
from analyses.successor.mod10 import mod10_probe
from analyses.successor.scores import build_circuit, effective_embeddings, score_tasks
from probe.models import LoadedModel
from probe.results import HeadScores


def run(model: LoadedModel, config: SuccessorConfig = SuccessorConfig(),
        progress: Progress | None = None) -> SuccessorResult:
    """Score every head, then (as configured) probe, arithmetic and the causal check."""
    config.validate()
    say = progress or no_progress
    say(0.0, "building succession tasks")
    task_set = build_tasks(model.tokenizer, config.number_max, config.wrap_around, config.min_items,
                           config.tasks or None, config.variants or None, config.require_numbers)
    all_ids = [i for t in task_set.tasks for i in t.token_ids]
    say(0.1, f"effective embeddings of {len(all_ids)} task tokens")
    circuit = build_circuit(model)
    embeddings = effective_embeddings(model, all_ids, config.include_residual, config.include_attn0)
    say(0.2, "effective OV circuits of every head")
    task_hits = score_tasks(model, task_set, config, circuit, embeddings)

    L, H = model.n_layers, model.n_heads
    names = task_set.task_names
    hits_by_task = {n: torch.zeros(L, H, dtype=torch.float64) for n in names}
    count_by_task = {n: 0 for n in names}
    chance_sum = {n: 0.0 for n in names}
    for th in task_hits:
        hits_by_task[th.task.task] += th.hits.double().sum(-1).cpu()
        count_by_task[th.task.task] += len(th.rows)
        chance_sum[th.task.task] += len(th.rows) / len(th.task.token_ids)
    total = sum(count_by_task.values())
    if total == 0:
        raise SuccessorError("No task token has a single-token successor; nothing to score.")
    scores = sum(hits_by_task.values()) / total
    per_task = torch.stack([hits_by_task[n] / max(1, count_by_task[n]) for n in names])
    task_chance = {n: chance_sum[n] / max(1, count_by_task[n]) for n in names}
    chance = sum(chance_sum.values()) / total

    prov = provenance(model, ANALYZER, VERSION, config, task_set.mapping(), config.seed)
    head_scores = HeadScores("successor score", "share of task tokens whose successor wins the restricted argmax",
                             scores, prov, "Gould et al. 2023 effective-OV successor score")
    top = head_scores.top(config.top_k)
    top_heads = [{"head": str(h), "score": s,
                  "per_task": {n: float(per_task[i, h.layer, h.head]) for i, n in enumerate(names)}} for h, s in top]
    result = SuccessorResult(
        scores=head_scores, task_names=names, per_task=per_task, task_chance=task_chance, chance=chance,
        n_scored=count_by_task, top_heads=top_heads,
        successor_heads=[str(h) for h, _ in head_scores.above(config.threshold)], threshold=config.threshold,
        mapping=task_set.mapping(), dropped=task_set.dropped, provenance=prov)

    if config.run_probe:
        say(0.4, "index-mod-10 probe")
        result.probe = mod10_probe(task_set, embeddings, config.probe_l2)
    if config.run_arithmetic:
        say(0.5, "vector arithmetic through the top head")
        result.arithmetic_head = str(top[0][0])
        result.arithmetic = vector_arithmetic(circuit, task_set, embeddings, top[0][0], config)
    if config.run_causal:
        say(0.6, "causal check in context")
        result.causal = causal_check(model, task_set, [h for h, _ in top[: config.ablate_top_k]], config, say)
    say(1.0, "done")
    return result
