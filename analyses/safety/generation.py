"""Judged greedy generations under interventions, and the perplexity of given answers (the damage measure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from analyses.safety.errors import SafetyError
from analyses.safety.judge import Judge, KeywordJudge
from analyses.safety.prompts import encode_prompts, render_prompt
from probe.generation import greedy_generate
from probe.interventions import Intervention, intervene
from probe.models import LoadedModel
from probe.prompting import stop_ids


@dataclass
class Generation:
    """One generated answer and the judge's verdict on it."""

    prompt: str
    output: str
    n_tokens: int
    finished: bool
    refused: bool
    rule: str
    token_ids: list[int] = field(default_factory=list)  # the generated ids (the damage measure re-scores them)


def generate(model: LoadedModel, queries: Sequence[str], interventions: Sequence[Intervention] = (),
             template: str = "chat", system: str | None = None, max_new_tokens: int = 48,
             judge: Judge | None = None, batch_size: int = 24) -> list[Generation]:
    """Greedy, KV-cached, left-padded batched generation with interventions in effect, judged.

    Uses the HF `generate` of the bridged model: its layers are the bridge's components, so the
    intervention hooks fire at every step (checked against `LoadedModel.generate` in the tests).
    """
    judge = judge or KeywordJudge()
    texts = [render_prompt(model, q, template, system) for q in queries]
    for ids in encode_prompts(model, queries, template, system, reserve=max_new_tokens):
        del ids  # encode_prompts raises the clear errors (empty set, too long)
    with intervene(model, list(interventions)):
        answers = greedy_generate(model, texts, max_new_tokens, batch_size, add_special_tokens=template != "chat")
    stops = stop_ids(model, "eos")  # where greedy_generate stops by default
    out = []
    for query, tokens in zip(queries, answers):
        finished = bool(tokens) and tokens[-1] in stops
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
        verdict = judge.judge(text, len(tokens) - int(finished), finished)
        out.append(Generation(query, text, len(tokens), finished, verdict.refused, verdict.rule, list(tokens)))
    return out


def verdict_changes(generations: Sequence[Generation], judge: Judge, other: Judge) -> int:
    """How many of these generations two judges decide differently (e.g. the scaled vs the paper's
    fixed short-output rule)."""
    count = 0
    for g in generations:
        text_tokens = g.n_tokens - int(g.finished)
        count += judge.judge(g.output, text_tokens, g.finished).refused != other.judge(g.output, text_tokens,
                                                                                       g.finished).refused
    return count


@torch.no_grad()
def answer_perplexity(model: LoadedModel, queries: Sequence[str], answers: Sequence[Sequence[int]],
                      interventions: Sequence[Intervention] = (), template: str = "chat",
                      system: str | None = None, batch_size: int = 16) -> float:
    """Perplexity of given answers (token ids) to `queries` under the model with `interventions`: exp of the
    mean next-token loss over all answer tokens (teacher forcing).

    The damage measure: fed the base model's own greedy harmless answers, an ablation that leaves the
    model intact keeps their perplexity near the base value; one that breaks it raises it. Rows are
    right-padded (causal attention: padding after a row's tokens changes nothing before them).
    """
    rows = []
    for query, answer in zip(queries, answers):
        if answer:
            prompt = model.encode(render_prompt(model, query, template, system),
                                  add_special_tokens=template != "chat")[0].tolist()
            rows.append((prompt, list(answer)))
    if not rows:
        raise SafetyError("No answer tokens to score: the perplexity needs at least one non-empty answer.")
    total, count = 0.0, 0
    with intervene(model, list(interventions)):
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin:begin + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            model.check_fits(width)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (prompt, answer) in enumerate(chunk):
                ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            log_probs = torch.log_softmax(model.logits(ids.to(model.device)).float(), dim=-1).cpu()
            for row, (prompt, answer) in enumerate(chunk):
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
                total -= float(log_probs[row, positions, torch.tensor(answer)].sum())
                count += len(answer)
    return math.exp(total / count)
