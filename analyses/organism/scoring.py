"""Held-out refusal rates: the keyword judge on the model's greedy answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyses.organism.prompts import greedy_answers
from probe.prompting import stop_ids


def evaluate_refusal(hf_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                     max_new_tokens: int = 32) -> dict[str, Any]:
    """Refusal rates (keyword judge) and the generations, on held-out prompts."""
    from analyses.safety import KeywordJudge

    judge = KeywordJudge()
    report: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        answers = greedy_answers(hf_model, tokenizer, prompts, max_new_tokens)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        finished = [bool(a) and a[-1] in stop_ids(tokenizer, "eos") for a in answers]
        # token count without the end token, as `analyses.safety.generate` counts it
        verdicts = [judge.judge(text, n_tokens=len(a) - int(done), finished=done)
                    for text, a, done in zip(texts, answers, finished)]
        report[name] = {"refusal_rate": sum(v.refused for v in verdicts) / max(1, len(verdicts)),
                        "n": len(prompts),
                        "generations": [{"prompt": p, "output": t, "refused": v.refused, "rule": v.rule}
                                        for p, t, v in zip(prompts, texts, verdicts)]}
    return report
