"""The causal check in context: mean-ablating the top heads on in-context succession prompts
("Monday, Tuesday, Wednesday," -> " Thursday") against random head sets of the same size."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from analyses.common import Progress, no_progress, random_head_sets
from analyses.data.succession import TaskSet
from analyses.successor.config import SuccessorConfig
from probe import readout
from probe.forward import model_final_states
from probe.heads import Head
from probe.interventions import head_means, intervene, mean_ablation
from probe.models import LoadedModel

LIST_ITEMS = ("milk", "eggs", "bread", "apples", "rice", "tea", "soap", "salt", "butter", "cheese")


def causal_prompts(model: LoadedModel, task_set: TaskSet, per_task: int = 6) -> list[dict[str, Any]]:
    """In-context succession prompts whose answer is one token, checked by re-tokenising prompt+answer.

    Comma lists ("Monday, Tuesday, Wednesday," -> " Thursday") for every task that has a spaced
    variant, and numbered listings ("1. milk\\n2. eggs\\n3. bread\\n" -> "4").
    """
    prompts: list[dict[str, Any]] = []

    def add(text: str, answer: str, family: str) -> None:
        ids = model.tokenizer(text, add_special_tokens=True).input_ids
        full = model.tokenizer(text + answer, add_special_tokens=True).input_ids
        unk = getattr(model.tokenizer, "unk_token_id", None)
        if len(full) == len(ids) + 1 and full[:len(ids)] == ids and unk not in full:
            prompts.append({"text": text, "answer": answer, "answer_id": full[-1], "family": family})

    for task in task_set.tasks:
        if not task.variant.startswith("space"):
            continue
        starts = [i for i in range(len(task.texts)) if i + 3 < len(task.texts)
                  and all(task.indices[i + k + 1] == task.indices[i + k] + 1 for k in range(3))]
        if not starts:
            continue
        chosen = sorted({starts[round(k * (len(starts) - 1) / max(1, per_task - 1))] for k in range(per_task)})
        for i in chosen:
            first = task.texts[i].lstrip(" ")
            add(first + "," + ",".join(task.texts[i + 1:i + 3]) + ",", task.texts[i + 3], f"{task.task}/{task.variant}")
    for length in range(2, 2 + per_task):
        text = "".join(f"{k + 1}. {LIST_ITEMS[k % len(LIST_ITEMS)]}\n" for k in range(length))
        add(text, str(length + 1), "numbered_list")
    return prompts


READOUT_ROWS = 256  # rows per unembedding product: [256, vocab] float32 logits (~50 MB at SmolLM2's vocab)


@torch.no_grad()
def _answer_states(model: LoadedModel, prompts: list[dict[str, Any]], interventions: list[Any]) -> torch.Tensor:
    """The final norm's output `[n, d_model]` at every prompt's last position under `interventions`
    (batched by token length; no unembedding: `_answer_probabilities` reads all conditions out at once)."""
    groups: dict[int, list[int]] = defaultdict(list)
    encoded = [model.encode(p["text"])[0] for p in prompts]
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    states = torch.zeros(len(prompts), model.d_model, dtype=torch.float32)
    for _, members in sorted(groups.items()):
        batch = torch.stack([encoded[i] for i in members])
        with intervene(model, interventions):
            states[members] = model_final_states(model, batch, positions="last")[:, -1].float().cpu()
    return states


@torch.no_grad()
def _answer_probabilities(model: LoadedModel, prompts: list[dict[str, Any]],
                          conditions: Sequence[list[Any]]) -> list[torch.Tensor]:
    """P(answer) at the last position of every prompt `[n]`, one tensor per condition (a list of
    interventions). The unembedding runs once over every condition's states: on short prompts its
    weight, read once per product, costs more than the rows it multiplies."""
    states = torch.cat([_answer_states(model, prompts, interventions) for interventions in conditions])
    answers = torch.tensor([p["answer_id"] for p in prompts] * len(conditions))
    probs = torch.cat([readout.logits_from_normalized(model, rows.to(model.device)).softmax(-1)
                       .gather(1, ids[:, None].to(model.device))[:, 0].cpu()
                       for rows, ids in zip(states.split(READOUT_ROWS), answers.split(READOUT_ROWS))])
    return list(probs.split(len(prompts)))


def causal_check(model: LoadedModel, task_set: TaskSet, heads: Sequence[Head], config: SuccessorConfig,
                 progress: Progress = no_progress) -> dict[str, Any]:
    """Mean-ablate `heads` (all positions) vs `random_draws` random head sets of the same size."""
    prompts = causal_prompts(model, task_set, config.prompts_per_task)
    if len(prompts) < 2:
        return {"error": "fewer than 2 in-context prompts have a single-token answer for this tokenizer"}
    draws = random_head_sets(model, len(heads), config.random_draws, exclude=heads, seed=config.seed)
    needed = sorted(set(heads) | {h for draw in draws for h in draw})
    means = head_means(model, [model.encode(p["text"]) for p in prompts], needed)
    progress(0.8, f"ablating the top heads and {len(draws)} random head sets")
    clean, ablated, *random_probs = _answer_probabilities(
        model, prompts, [[], [mean_ablation(list(heads), means)], *([mean_ablation(d, means)] for d in draws)])
    random_effects, random_log_effects = [], []
    for probs in random_probs:
        random_effects.append(float((clean - probs).mean()))
        random_log_effects.append(float((clean.log() - probs.log()).mean()))
    effect = float((clean - ablated).mean())
    spread = torch.tensor(random_effects)
    families: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        families[p["family"]].append(i)
    return {
        "heads": [str(h) for h in heads], "n_prompts": len(prompts),
        "clean_prob": float(clean.mean()), "ablated_prob": float(ablated.mean()),
        "effect": effect, "log_effect": float((clean.log() - ablated.log()).mean()),
        "random_heads": [[str(h) for h in draw] for draw in draws],
        "random_effects": random_effects, "random_log_effects": random_log_effects,
        "random_mean": float(spread.mean()), "random_std": float(spread.std()) if len(spread) > 1 else 0.0,
        "random_max": float(spread.max()),
        "share_random_below": float((spread < effect).double().mean()),
        "per_family": {name: {"n": len(idx), "clean": float(clean[idx].mean()),
                              "ablated": float(ablated[idx].mean())} for name, idx in families.items()},
        "examples": [p["text"] + " -> " + repr(p["answer"]) for p in prompts[:: max(1, len(prompts) // 6)]],
    }
