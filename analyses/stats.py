"""The evidence module: the one place analyzers' statistics live (intervals, resampling, tests).

Analyzers import their intervals and tests from here, so each statistic has one implementation
and one set of tests. Hand-written on numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from probe.errors import ProbeError


class StatisticsError(ProbeError):
    """A statistic asked of data that cannot give it (an empty sample, labels that do not match)."""


# ---- intervals of a rate or a mean over prompts -----------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (honest at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        raise StatisticsError("A rate over zero prompts is undefined (empty split).")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


BOOTSTRAP_DRAWS = 2000


def cluster_bootstrap_interval(values: Sequence[float], clusters: Sequence[str], draws: int = BOOTSTRAP_DRAWS,
                               seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a mean over prompts when prompts come in clusters (here: countries).

    Prompts about one country share its fact, so they are not independent: a Wilson interval over
    prompts is too narrow. Whole clusters are resampled with replacement (seeded numpy Generator) and
    the statistic is the pooled mean over the prompts of the drawn clusters (a ratio estimator, so
    clusters of unequal size weigh by their prompts, as in the point estimate)."""
    if len(values) != len(clusters):
        raise StatisticsError(f"{len(values)} values but {len(clusters)} cluster labels.")
    if not values:
        raise StatisticsError("A rate over zero prompts is undefined (empty split).")
    names = list(dict.fromkeys(clusters))
    index = {name: i for i, name in enumerate(names)}
    members = np.array([index[c] for c in clusters])
    sums = np.bincount(members, weights=np.asarray(values, dtype=np.float64), minlength=len(names))
    sizes = np.bincount(members, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=draws)  # [draws, clusters]
    stats = (weights @ sums) / (weights @ sizes)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


# ---- one-sided tests of a found group against random groups ------------------------------------

def fisher_one_sided(found: int, found_n: int, other: int, other_n: int) -> float:
    """One-sided Fisher exact p-value that the found group's success rate (`found` of `found_n`) exceeds the
    other's (`other` of `other_n`): P(X >= found) for X hypergeometric with the table's margins."""
    if not (0 <= found <= found_n and 0 <= other <= other_n) or found_n < 1 or other_n < 1:
        raise StatisticsError(f"Bad 2x2 table: {found}/{found_n} vs {other}/{other_n}.")
    total, successes = found_n + other_n, found + other
    top = min(successes, found_n)
    if found > top:
        return 0.0
    # log-space terms (lgamma): exact integers grow huge for the prompt counts `prompts_needed` scans
    logs = [_log_comb(successes, x) + _log_comb(total - successes, found_n - x) for x in range(found, top + 1)]
    peak = max(logs)
    return min(1.0, math.exp(peak + math.log(sum(math.exp(v - peak) for v in logs)) - _log_comb(total, found_n)))


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def permutation_p(found: Sequence[bool], randoms: Sequence[Sequence[bool]]) -> float:
    """Exact one-sided p-value of a per-prompt permutation test: found group vs `randoms` (one outcome list
    per random group, aligned by prompt).

    Null: the found group is one more random group, so at each prompt the label "found" could sit on
    any of the D + 1 conditions with equal chance, independently across prompts. Statistic: sum over
    prompts of found - mean(random). Its null distribution is the convolution of the prompts' uniform
    choices (integer steps after multiplying by D), computed exactly; p = P(T* >= T).
    """
    draws = len(randoms)
    if draws < 1 or any(len(r) != len(found) for r in randoms) or not found:
        raise StatisticsError("The permutation test needs one or more random groups with an outcome per prompt.")
    columns = [[int(found[i])] + [int(r[i]) for r in randoms] for i in range(len(found))]
    # D * (x_j - mean of the others) = (D + 1) x_j - S, an integer per condition j
    steps = [[(draws + 1) * x - sum(col) for x in col] for col in columns]
    observed = sum(step[0] for step in steps)
    distribution = {0: 1.0}
    for step in steps:
        nxt: dict[int, float] = {}
        for total, prob in distribution.items():
            for value in step:
                nxt[total + value] = nxt.get(total + value, 0.0) + prob / len(step)
        distribution = nxt
    return min(1.0, sum(prob for total, prob in distribution.items() if total >= observed))


STREAK = 25  # prompts_needed: consecutive prompt counts that must all reach p < alpha


def prompts_needed(found_rate: float, random_rate: float, draws: int, alpha: float = 0.05,
                   power: float = 0.8, limit: int = 2000) -> dict[str, float | int | None]:
    """How many held-out prompts an effect of this size needs, two ways (stated with every result):

    - `at_observed`: the smallest n from which on the observed rates, as counts (found round(f n) of n,
      random round(r n D) of n D), give a one-sided Fisher p < alpha (for `STREAK` consecutive n: the
      rounding makes p jump): the n that would have reached significance had the rates stayed the
      same (about 50 % power);
    - `for_power`: n for `power` (default 80 %) with a one-sided two-proportion z-test, groups n and n D
      (normal approximation). None where the found rate does not exceed the random one, or n > `limit`.
    """
    if found_rate <= random_rate:
        return {"at_observed": None, "for_power": None, "alpha": alpha, "power": power}
    at_observed, streak = None, 0
    for n in range(1, limit + 1):  # rounding to counts makes p jump: take the n from which it stays < alpha
        a, b = round(found_rate * n), round(random_rate * n * draws)
        significant = fisher_one_sided(min(a, n), n, min(b, n * draws), n * draws) < alpha
        streak = streak + 1 if significant else 0
        if streak == STREAK:
            at_observed = n - STREAK + 1
            break
    from statistics import NormalDist

    z_a, z_b = NormalDist().inv_cdf(1 - alpha), NormalDist().inv_cdf(power)
    pooled = (found_rate + draws * random_rate) / (1 + draws)
    spread_null = math.sqrt(pooled * (1 - pooled) * (1 + 1 / draws))
    spread_alt = math.sqrt(found_rate * (1 - found_rate) + random_rate * (1 - random_rate) / draws)
    n_power = math.ceil(((z_a * spread_null + z_b * spread_alt) / (found_rate - random_rate)) ** 2)
    return {"at_observed": at_observed, "for_power": n_power if n_power <= limit else None,
            "alpha": alpha, "power": power}


# ---- mean and spread -------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (the spread of random groups' rates); NaN for no values."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    return mean, (sum((x - mean) ** 2 for x in values) / len(values)) ** 0.5
