"""The fair circuit-discovery comparison: CD-T, path patching, EAP and EAP-IG, each at three
search levels, on the same discovery prompts, the same held-out evaluation prompts, the same mean
ablation and the same circuit sizes.

Search levels (`circuits.iterative_search`, `per_iteration` heads per iteration up to `max_heads`):
- `rank`: the method's ranking only (CD-T / path patching: Alg. 1's iterations, scoring senders
  against the last iteration's heads; EAP / EAP-IG: node scores, the next heads by |score|);
- `prune`: + Alg. 1's greedy pruning of each iteration's picks on the discovery prompts' mean-ablation
  metric (`lookahead=1`: nothing refilled);
- `prune+refill`: + refilling from the next `lookahead × per_iteration` ranked candidates.
Beyond `max_heads`, each circuit is extended by the method's first ranking (|score| to the metric) so
that every size of the MIB fraction axis (fractions of heads, rounded up) has a circuit.

Faithfulness f = (m(C) − m(∅)) / (m(M) − m(∅)) on the evaluation prompts (non-circuit heads
mean-ablated with their own template's means); CPR = ∫ f, CMD = ∫ |1 − f| over the
fraction axis (trapezoids); random circuits: `random_draws` seeded draws per size (mean ± std).
Discovery wall time per method and level counts the shared scoring it used (the CD-T sweep, every
path-patching pass, the attribution passes) plus its own pruning.

    python -m analyses.cdt.method_comparison --model smollm2-135m --config configs/cdt_compare.yaml --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from analyses.cdt import baselines, circuits, tasks
from analyses.cdt.arch import CDTError
from analyses.cdt.circuits import Circuit, ScoreFn
from analyses.cdt.engine import Engine, RuleOptions
from analyses.cdt.tasks import LogitDiffBatch
from analyses.common import random_head_sets
from probe.heads import Head

VERSION = "0.1"
METHODS = ("cd-t", "path-patching", "eap", "eap-ig")
LEVELS = ("rank", "prune", "prune+refill")
TASKS = ("ioi", "successor", "planted-induction")


class OverlapError(CDTError):
    """Discovery and evaluation prompts share a text: the evaluation would not be held out."""


@dataclass(frozen=True)
class MethodComparisonConfig:
    """Prompts, search and evaluation settings shared by every method (docs/cdt.md, "Fair comparison")."""

    tasks: tuple[str, ...] = ("ioi", "successor")
    ioi_templates: tuple[int, ...] = (0, 1)
    ioi_discovery_per_template: int = 2
    ioi_evaluation_per_template: int = 10
    successor_kinds: tuple[str, ...] = ("numbers",)
    successor_run: int = 4
    successor_discovery_templates: tuple[int, ...] = (0,)  # tasks.SUCCESSOR_TEMPLATES
    successor_evaluation_templates: tuple[int, ...] = (1, 2, 3)
    discovery_max_per_batch: int = 0  # 0: every prompt of a discovery batch; else the first n
    evaluation_max_per_batch: int = 0  # the same for the evaluation batches
    planted_discovery: int = 8
    planted_evaluation: int = 12
    methods: tuple[str, ...] = METHODS
    levels: tuple[str, ...] = LEVELS
    per_iteration: int = 4
    max_heads: int = 8
    lookahead: int = 2
    ig_steps: int = 5
    fractions: tuple[float, ...] = baselines.MIB_FRACTIONS
    random_draws: int = 5
    target_mode: str = "weighted"
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodComparisonConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CDTError(f"Unknown compare setting(s): {', '.join(unknown)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _check(config: MethodComparisonConfig) -> None:
    for name, given, allowed in (("task", config.tasks, TASKS), ("method", config.methods, METHODS),
                                 ("level", config.levels, LEVELS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise CDTError(f"Unknown {name}(s) {', '.join(bad)}; choose from {', '.join(allowed)}.")
    if config.per_iteration < 1 or config.max_heads < 1 or config.ig_steps < 1 or config.random_draws < 1:
        raise CDTError("per_iteration, max_heads, ig_steps and random_draws must be at least 1.")
    if not config.fractions or any(not 0 < f <= 1 for f in config.fractions):
        raise CDTError("fractions must be in (0, 1].")


# ---- prompts ----------------------------------------------------------------------------------------

def _rows(batch: LogitDiffBatch, keep: list[int]) -> LogitDiffBatch:
    index = torch.tensor(keep, dtype=torch.long, device=batch.ids.device)
    return LogitDiffBatch(batch.name, batch.ids[index], batch.good[index], batch.bad[index], batch.mean_source_ids,
                          [batch.texts[i] for i in keep])


def without_texts(batches: Sequence[LogitDiffBatch], seen: set[str]) -> list[LogitDiffBatch]:
    """The batches with every prompt whose text is in `seen` removed (empty batches dropped)."""
    out = []
    for batch in batches:
        keep = [i for i, text in enumerate(batch.texts) if text not in seen]
        if keep:
            out.append(batch if len(keep) == batch.n_prompts else _rows(batch, keep))
    return out


def require_disjoint(discovery: Sequence[LogitDiffBatch], evaluation: Sequence[LogitDiffBatch]) -> None:
    """Refuse a comparison whose evaluation prompts are not held out from discovery."""
    shared = {t for b in discovery for t in b.texts} & {t for b in evaluation for t in b.texts}
    if shared:
        example = sorted(shared)[0]
        raise OverlapError(f"{len(shared)} evaluation prompt(s) are also discovery prompts (e.g. {example!r}); "
                           "the evaluation must be held out: use other seeds, templates or prompts.")
    if not discovery or not evaluation:
        raise CDTError("The comparison needs at least one discovery and one evaluation prompt.")


def task_prompts(model, task: str,
                 config: MethodComparisonConfig) -> tuple[list[LogitDiffBatch], list[LogitDiffBatch]]:
    """Discovery and held-out evaluation batches of a task (evaluation prompts that repeat a
    discovery text are dropped; `require_disjoint` then checks)."""
    if task == "ioi":
        discovery = tasks.ioi_batches(model, config.ioi_discovery_per_template, seed=config.seed,
                                      templates=config.ioi_templates)
        evaluation = tasks.ioi_batches(model, config.ioi_evaluation_per_template, seed=config.seed + 1000,
                                       templates=config.ioi_templates)
    elif task == "successor":
        shared = set(config.successor_discovery_templates) & set(config.successor_evaluation_templates)
        if shared:
            raise OverlapError(f"Successor template(s) {sorted(shared)} are both discovery and evaluation templates.")
        discovery = tasks.successor_template_batches(model, config.successor_discovery_templates,
                                                     config.successor_kinds, config.successor_run, seed=config.seed)
        evaluation = tasks.successor_template_batches(model, config.successor_evaluation_templates,
                                                      config.successor_kinds, config.successor_run,
                                                      seed=config.seed + 1000)
    else:
        from analyses.planted.induction import induction_batch

        discovery = [induction_batch(model, n=config.planted_discovery, seed=config.seed)]
        evaluation = [induction_batch(model, n=config.planted_evaluation, seed=config.seed + 1000)]
    if config.discovery_max_per_batch:
        discovery = [_rows(b, list(range(min(b.n_prompts, config.discovery_max_per_batch)))) for b in discovery]
    evaluation = without_texts(evaluation, {t for b in discovery for t in b.texts})
    if config.evaluation_max_per_batch:
        evaluation = [_rows(b, list(range(min(b.n_prompts, config.evaluation_max_per_batch)))) for b in evaluation]
    require_disjoint(discovery, evaluation)
    return discovery, evaluation


# ---- discovery ----------------------------------------------------------------------------------------

class _Memo:
    """A score function computed once per target set, remembering what each computation cost."""

    def __init__(self, fn: ScoreFn) -> None:
        self.fn, self.cache, self.cost = fn, {}, {}
        self.used: set = set()
        self.spent = 0.0  # time inside calls (computing or looking up)

    def __call__(self, targets: list[Head] | None):
        start = time.perf_counter()
        key = None if targets is None else tuple(sorted(targets))
        if key not in self.cache:
            self.cache[key] = self.fn(targets)
            self.cost[key] = time.perf_counter() - start
        self.used.add(key)
        self.spent += time.perf_counter() - start
        return self.cache[key]


@dataclass
class Scorer:
    """One method's score function (memoised), its set-up cost, and whether it scores per target."""

    method: str
    memo: _Memo
    setup_seconds: float
    upstream_only: bool


def scorer(model, method: str, discovery: Sequence[LogitDiffBatch], config: MethodComparisonConfig,
           means: Sequence[dict[Head, torch.Tensor]]) -> Scorer:
    """Build `method`'s score function on the discovery prompts (CD-T: the fast sweep, timed here)."""
    start = time.perf_counter()
    if method == "cd-t":
        from analyses.cdt.fast import fast_sweep

        engine = Engine(model, config.dtype, RuleOptions())
        fn = circuits.cdt_score_fn(fast_sweep(engine, list(discovery)), config.target_mode)
        upstream = True
    elif method == "path-patching":
        from analyses.cdt import patching

        fn, upstream = patching.path_patching_score_fn(model, discovery, means), True
    elif method == "eap":
        fn, upstream = baselines.attribution_score_fn(model, discovery, 1, "mean", means), False
    elif method == "eap-ig":
        fn, upstream = baselines.attribution_score_fn(model, discovery, config.ig_steps, "counterfactual"), False
    else:
        raise CDTError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    return Scorer(method, _Memo(fn), time.perf_counter() - start, upstream)


def discover(model, scorer_: Scorer, level: str, config: MethodComparisonConfig,
             metric: circuits.CircuitMetric | None) -> tuple[Circuit, float]:
    """One method at one search level: the circuit and its discovery wall time (shared scoring it
    used, counted in full, plus its own search)."""
    if level not in LEVELS:
        raise CDTError(f"Unknown level {level!r}; choose from {', '.join(LEVELS)}.")
    memo = scorer_.memo
    memo.used, memo.spent = set(), 0.0
    start = time.perf_counter()
    circuit = circuits.iterative_search(
        memo, model.n_layers, model.n_heads, config.per_iteration, config.max_heads, f"{scorer_.method}/{level}",
        circuit_metric=None if level == "rank" else metric, lookahead=1 if level == "prune" else config.lookahead,
        upstream_only=scorer_.upstream_only)
    own = time.perf_counter() - start - memo.spent
    return circuit, scorer_.setup_seconds + own + sum(memo.cost[k] for k in memo.used)


def ordered_heads(model, circuit: Circuit, first_scores: torch.Tensor) -> list[Head]:
    """The circuit's heads, then every other head by |first-ranking score| (NaN last)."""
    chosen = set(circuit.heads)
    rest = [h for h in model.all_heads() if h not in chosen]
    magnitude = torch.nan_to_num(first_scores.abs().double(), nan=-1.0)
    rest.sort(key=lambda h: -float(magnitude[h.layer, h.head]))
    return list(circuit.heads) + rest


# ---- one task --------------------------------------------------------------------------------------

def _spread(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def compare_methods_on_task(model, task: str, config: MethodComparisonConfig,
                            say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every method × level on one task: curves, CPR, CMD, times, the random baseline."""
    discovery, evaluation = task_prompts(model, task, config)
    n = len(model.all_heads())
    sizes = baselines.sizes_for(n, config.fractions)
    fractions = list(config.fractions)
    disc_means = [circuits.batch_means(model, b) for b in discovery]
    metric = circuits.discovery_metric(model, discovery, disc_means)
    found: dict[str, dict[str, dict[str, Any]]] = {}
    orders: dict[tuple[str, str], list[Head]] = {}
    for method in config.methods:
        say(f"{task}: {method} scoring")
        s = scorer(model, method, discovery, config, disc_means)
        first = s.memo(None)[0]
        found[method] = {}
        for level in config.levels:
            say(f"{task}: {method} {level}")
            circuit, seconds = discover(model, s, level, config, metric)
            orders[(method, level)] = ordered_heads(model, circuit, first)
            found[method][level] = {"seconds": seconds, "circuit": [str(h) for h in circuit.heads],
                                    "iterations": [[str(h) for h in it] for it in circuit.iterations]}
    say(f"{task}: evaluation")
    eval_means = [circuits.batch_means(model, b) for b in evaluation]
    base = circuits.faithfulness_baselines(model, evaluation, eval_means)
    base.require_signal()
    draws = {size: random_head_sets(model, size, config.random_draws, exclude=[], seed=config.seed + 7919 * size)
             for size in sorted(set(sizes))}
    wanted: dict[frozenset, None] = {}
    for order in orders.values():
        for size in sizes:
            wanted[frozenset(order[:size])] = None
    for size_draws in draws.values():
        for d in size_draws:
            wanted[frozenset(d)] = None
    everything = frozenset(model.all_heads())
    todo = [k for k in wanted if k != everything]
    values = dict(zip(todo, circuits.metrics_with_circuits(model, evaluation, eval_means, [sorted(k) for k in todo])))
    values[everything] = base.full

    def faith(heads) -> float:
        return base.of(values[frozenset(heads)])

    for (method, level), order in orders.items():
        curve = [faith(order[:size]) for size in sizes]
        found[method][level].update(faithfulness=curve, cpr=baselines.cpr(fractions, curve),
                                    cmd=baselines.cmd(fractions, curve))
    random_curves = [[faith(draws[size][d]) for size in sizes] for d in range(config.random_draws)]
    cprs = [baselines.cpr(fractions, c) for c in random_curves]
    cmds = [baselines.cmd(fractions, c) for c in random_curves]
    by_size = list(zip(*random_curves))
    random = {"draws": config.random_draws, "faithfulness_mean": [statistics.fmean(v) for v in by_size],
              "faithfulness_std": [_spread(v) for v in by_size], "cpr_mean": statistics.fmean(cprs),
              "cpr_std": _spread(cprs), "cmd_mean": statistics.fmean(cmds), "cmd_std": _spread(cmds)}
    return {"task": task, "n_heads": n, "fractions": fractions, "sizes": sizes,
            "discovery_prompts": sum(b.n_prompts for b in discovery),
            "evaluation_prompts": sum(b.n_prompts for b in evaluation),
            "discovery_texts": [t for b in discovery for t in b.texts],
            "evaluation_texts": [t for b in evaluation for t in b.texts],
            "full_metric": base.full, "empty_metric": base.empty,
            "evaluation_accuracy": tasks.accuracy(model, evaluation),
            "methods": found, "random": random, "winners": winners(found)}


def winners(found: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """The best method/level by CPR (highest) and by CMD (lowest), per level and overall."""
    out: dict[str, list[str]] = {}
    cells = [(m, lv, r) for m, levels in found.items() for lv, r in levels.items() if "cpr" in r]
    for level in {lv for _, lv, _ in cells} | {"any"}:
        pool = [c for c in cells if level in ("any", c[1])]
        if pool:
            best_cpr = max(pool, key=lambda c: c[2]["cpr"])
            best_cmd = min(pool, key=lambda c: c[2]["cmd"])
            out[level] = [f"{best_cpr[0]}/{best_cpr[1]}", f"{best_cmd[0]}/{best_cmd[1]}"]  # [by CPR, by CMD]
    return out


@dataclass
class MethodComparisonResult:
    model: str
    config: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    machine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"analyzer": "cdt-compare", "version": VERSION, "model": self.model, "config": self.config,
                "tasks": self.tasks, "machine": self.machine}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodComparisonResult:
        return cls(data["model"], data["config"], data["tasks"], data.get("machine", {}))


def _load_average() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def compare_methods(model, config: MethodComparisonConfig = MethodComparisonConfig(),
                    say: Callable[[str], None] = lambda _: None) -> MethodComparisonResult:
    """The fair comparison on every task of the config (see the module docstring)."""
    _check(config)
    machine: dict[str, Any] = {"threads": torch.get_num_threads(), "load_average_start": _load_average()}
    start = time.perf_counter()
    results = {task: compare_methods_on_task(model, task, config, say) for task in config.tasks}
    machine.update(load_average_end=_load_average(), total_seconds=time.perf_counter() - start)
    return MethodComparisonResult(model.spec, asdict(config), results, machine)


def table(result: MethodComparisonResult) -> str:
    """Markdown: per task, method × level with CPR, CMD and discovery time, then the random baseline."""
    lines = []
    for task, r in result.tasks.items():
        lines += [f"**{task}** ({r['discovery_prompts']} discovery / {r['evaluation_prompts']} held-out evaluation "
                  f"prompts; {r['n_heads']} heads; sizes {r['sizes']})", "",
                  "| method | level | CPR ↑ | CMD ↓ | discovery s | f at " + " / ".join(str(s) for s in r["sizes"]) + " |",
                  "|---|---|---|---|---|---|"]
        for method, levels in r["methods"].items():
            for level, cell in levels.items():
                curve = " / ".join(f"{v:.2f}" for v in cell["faithfulness"])
                lines.append(f"| {method} | {level} | {cell['cpr']:.3f} | {cell['cmd']:.3f} | {cell['seconds']:.1f} | {curve} |")
        rnd = r["random"]
        curve = " / ".join(f"{m:.2f}±{s:.2f}" for m, s in zip(rnd["faithfulness_mean"], rnd["faithfulness_std"]))
        lines += [f"| random ({rnd['draws']} draws) | — | {rnd['cpr_mean']:.3f} ± {rnd['cpr_std']:.3f} | "
                  f"{rnd['cmd_mean']:.3f} ± {rnd['cmd_std']:.3f} | — | {curve} |", ""]
    return "\n".join(lines)


def load_config(path: str) -> MethodComparisonConfig:
    import yaml

    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    return MethodComparisonConfig.from_dict(data.get("cdt_compare", data))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CD-T vs path patching vs EAP / EAP-IG, held out (docs/cdt.md).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", default="", help="comma-separated: only these of the config's tasks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from probe.models import load_model

    model = load_model(args.model, device="cpu")
    start = time.perf_counter()
    config = load_config(args.config)
    if args.tasks:
        from dataclasses import replace

        config = replace(config, tasks=tuple(args.tasks.split(",")))
    result = compare_methods(model, config,
                             say=lambda m: print(f"[{time.perf_counter() - start:7.1f} s] {m}", flush=True))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result.to_json(), handle, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
