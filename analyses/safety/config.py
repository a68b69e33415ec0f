"""Every setting of a safety run, and the demo scan's preset."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from analyses.data.harmless import REFUSAL_PHRASES
from analyses.safety.judge import PAPER_MAX_NEW_TOKENS, PAPER_SHORT_TOKENS, KeywordJudge


@dataclass(frozen=True)
class SafetyConfig:
    """Every knob of a Ships/Sahara run (defaults sized for a 2-core CPU)."""

    ablation: str = "query"  # query = UA (paper default), output = SC
    epsilon: float = 1e-5
    template: str = "chat"  # chat | paper | plain
    system_prompt: str | None = None
    attribution_prompts: tuple[str, ...] | None = None  # None: StrongREJECT training split
    n_ships_prompts: int = 4
    ships_rescore: int | None = None  # None: exact Ships of every head; k: first-order screen + exact top k
    n_sahara_prompts: int = 16
    group_size: int = 3  # S
    sahara_pool: int | None = 27  # None: every head at every step (the paper); k: the k best by Ships
    r_main: int = 1
    center: bool = False
    batch_rows: int = 32
    validate: bool = True
    eval_harmful: tuple[str, ...] | None = None  # None: StrongREJECT held-out split
    eval_harmless: tuple[str, ...] | None = None  # None: harmless held-out split
    n_eval_harmful: int | None = 40
    n_eval_harmless: int | None = 20
    max_new_tokens: int = 48
    random_draws: int = 5
    random_on_harmless: bool = True  # random groups answer the harmless prompts too
    damage: bool = True  # perplexity of the base model's own greedy harmless answers per condition
    query_level: int = 0  # k > 0: the paper's query-level experiment on the first k held-out harmful prompts
    judge_paper_keywords: bool = False
    judge_phrases: tuple[str, ...] | None = None  # None: REFUSAL_PHRASES
    judge_short: bool = True
    judge_short_scaled: bool = True  # short = fewer than 32/128 of max_new_tokens tokens (False: the paper's 32)
    judge_repeat: bool = True
    held_out: float = 0.3
    seed: int = 0

    @property
    def short_tokens(self) -> int:
        """The short-output threshold: the paper's 32 tokens at 128 new tokens, scaled to this run's length."""
        if not self.judge_short_scaled:
            return PAPER_SHORT_TOKENS
        return max(1, math.ceil(PAPER_SHORT_TOKENS * self.max_new_tokens / PAPER_MAX_NEW_TOKENS))

    def judge(self) -> KeywordJudge:
        return KeywordJudge(phrases=self.judge_phrases or REFUSAL_PHRASES, paper_keywords=self.judge_paper_keywords,
                            use_short=self.judge_short, short_tokens=self.short_tokens, use_repeat=self.judge_repeat)

    def paper_short_judge(self) -> KeywordJudge:
        """The same judge with the paper's fixed 32-token short rule (to count the verdicts scaling changes)."""
        return replace(self.judge(), short_tokens=PAPER_SHORT_TOKENS)


# CPU-sized settings for the demo scan: 2 Ships prompts, a 2-head Sahara group over the 9 best Ships
# heads on 4 prompts, validation on 8 harmful / 4 harmless prompts, 16 new tokens, 2 random draws.
# Validation generates (1 + S x (1 + draws)) x prompts answers: the slow part of a run.
QUICK = SafetyConfig(n_ships_prompts=2, n_sahara_prompts=4, sahara_pool=9, group_size=2, n_eval_harmful=8,
                     n_eval_harmless=4, max_new_tokens=16, random_draws=2)
