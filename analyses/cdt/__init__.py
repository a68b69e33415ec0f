"""CD-T (contextual decomposition for transformers): exact β/γ decomposition and circuit discovery.

`run(model, CDTConfig(...))` builds the task (IOI by default), sweeps every head as a source (the
fast β-only sweep, `fast.py`: one pass per source layer from the clean totals), runs the iterative
search, evaluates faithfulness under mean ablation against random circuits of the same sizes,
optionally runs the path-patching baseline on the same prompts, and returns a `CDTResult` whose
`scores` are every head's CD-T relevance to the task's logit difference. `summary(result)` and
`figures(result)` present it. Submodules: arch (weights per architecture), rules, engine (the
two-stream reference pass), fast, circuits, patching (baseline), tasks, local (word relevance vs
occlusion), planted (a known two-head circuit), plots (plotly figures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from analyses.cdt import circuits, rules, tasks
from analyses.cdt.arch import CDTError, UnsupportedArchitectureError
from analyses.cdt.circuits import Circuit
from analyses.cdt.engine import Engine, RuleOptions
from analyses.cdt.fast import fast_sweep
from analyses.common import Progress, no_progress, provenance, random_head_sets
from probe.results import HeadScores, Provenance

VERSION = "0.2"
__all__ = ["CDTConfig", "CDTResult", "QUICK", "run", "summary", "figures", "CDTError",
           "UnsupportedArchitectureError", "Engine"]

TASKS = ("ioi", "successor", "planted-induction")
TARGET_MODES = ("input", "z", "weighted")


@dataclass(frozen=True)
class CDTConfig:
    """Task, search and evaluation settings (see docs/cdt.md for what each choice means)."""

    task: str = "ioi"  # ioi | successor | planted-induction (only the planted model of analyses/planted/induction.py)
    templates: tuple[int, ...] = (0, 1)  # IOI templates (one batch each)
    successor_kinds: tuple[str, ...] = ("numbers",)  # successor task: sequences (tasks.SEQUENCES)
    successor_run: int = 4  # items shown before the one to predict
    discovery_per_template: int = 2
    evaluation_per_template: int = 10
    per_iteration: int = 4
    max_heads: int = 12
    min_relative: float = 0.0
    target_mode: str = "weighted"  # weighted | input | z (how later iterations score senders)
    attention_rule: str = "paper"
    product_rule: str = "relevant_only"
    stabilise: bool = True
    ln_bias_rule: str = "input"  # LayerNorm bias split: input (authors' code) | normalised
    dtype: str = "float32"
    random_draws: int = 10
    curve_every: int = 1  # faithfulness at sizes k, 2k, … (and the full circuit)
    prune: bool = True  # Alg. 1's greedy pruning (and refill) of each iteration on the discovery prompts
    lookahead: int = 2  # refill candidates: the first lookahead × per_iteration ranked heads
    baseline: bool = True  # also run path patching on the same prompts (slow)
    seed: int = 0


# The demo scan's preset: one sweep on 4 IOI prompts, faithfulness at 4/8/12 heads, no baseline.
# demo-scan size (the default took 325 s in a demo scan on a loaded 2-core CPU; discovery dominates)
QUICK = CDTConfig(evaluation_per_template=8, max_heads=8, random_draws=3, curve_every=4, baseline=False)


@dataclass
class CDTResult:
    relevance_to_output: HeadScores
    circuit: Circuit
    sizes: list[int]
    faithfulness: dict[str, list[Any]]
    full_metric: float
    empty_metric: float
    accuracy: dict[str, float]
    provenance: Provenance
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> HeadScores:
        """The analyzer contract's head scores: CD-T relevance of each head to the logit difference."""
        return self.relevance_to_output

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.relevance_to_output.to_json(), "circuit": self.circuit.to_json(),
                "sizes": self.sizes, "faithfulness": self.faithfulness, "full_metric": self.full_metric,
                "empty_metric": self.empty_metric, "accuracy": self.accuracy,
                "provenance": self.provenance.__dict__, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CDTResult:
        return cls(HeadScores.from_json(data["scores"]), Circuit.from_json(data["circuit"]),
                   list(data["sizes"]), data["faithfulness"], data["full_metric"], data["empty_metric"],
                   data["accuracy"], Provenance.from_json(data["provenance"]), data.get("extra", {}))


def _check(config: CDTConfig) -> None:
    if config.task not in TASKS:
        raise CDTError(f"Unknown task {config.task!r}; choose one of {', '.join(TASKS)}.")
    if config.target_mode not in TARGET_MODES:
        raise CDTError(f"Unknown target_mode {config.target_mode!r}; choose one of {', '.join(TARGET_MODES)}.")
    if config.per_iteration < 1 or config.max_heads < 1 or config.curve_every < 1:
        raise CDTError("per_iteration, max_heads and curve_every must be at least 1.")
    if config.ln_bias_rule not in rules.LN_BIAS_SPLITS:
        raise CDTError(f"Unknown ln_bias_rule {config.ln_bias_rule!r}; choose one of {', '.join(rules.LN_BIAS_SPLITS)}.")


def _batches(model, config: CDTConfig, evaluation: bool) -> list[tasks.LogitDiffBatch]:
    seed = config.seed + (1000 if evaluation else 0)
    if config.task == "ioi":
        n = config.evaluation_per_template if evaluation else config.discovery_per_template
        return tasks.ioi_batches(model, n, seed=seed, templates=config.templates)
    if config.task == "planted-induction":
        from analyses.planted.induction import LETTERS, WORDS, induction_batch

        vocab = model.tokenizer.get_vocab()
        if model.d_vocab != len(WORDS) or any(letter not in vocab for letter in LETTERS):
            raise CDTError("The planted-induction task needs the planted model's vocabulary (analyses.planted.induction).")
        n = config.evaluation_per_template if evaluation else config.discovery_per_template
        return [induction_batch(model, n=n, seed=seed)]
    return tasks.successor_batches(model, kinds=config.successor_kinds, run=config.successor_run, seed=seed)


def curve_sizes(n_heads: int, every: int) -> list[int]:
    """Circuit sizes at which faithfulness is measured: every `every` heads, and the whole circuit."""
    return sorted({*range(every, n_heads + 1, every), n_heads}) if n_heads else []


def run(model, config: CDTConfig = CDTConfig(), progress: Progress | None = None) -> CDTResult:
    """Sweep, search, evaluate (and optionally the path-patching baseline); see the module docstring."""
    _check(config)
    say = progress or no_progress
    engine = Engine(model, config.dtype, RuleOptions(config.attention_rule, config.product_rule, config.stabilise,
                                                     config.ln_bias_rule))
    say(0.0, "building the task")
    discovery = _batches(model, config, evaluation=False)
    evaluation = _batches(model, config, evaluation=True)
    share = 0.5 if config.baseline else 0.8
    start = time.perf_counter()
    result = fast_sweep(engine, discovery, progress=lambda f, m: say(share * f, m))
    say(share, "circuit search")
    metric = circuits.discovery_metric(model, discovery, result.z_means) if config.prune else None
    circuit = circuits.iterative_search(circuits.cdt_score_fn(result, config.target_mode), model.n_layers,
                                        model.n_heads, config.per_iteration, config.max_heads, "cd-t",
                                        config.min_relative, metric, config.lookahead)
    timings = {"cdt_seconds": time.perf_counter() - start}
    baseline = None
    if config.baseline:
        from analyses.cdt import patching

        say(share, "path-patching baseline")
        start = time.perf_counter()
        baseline = circuits.iterative_search(patching.path_patching_score_fn(model, discovery), model.n_layers,
                                             model.n_heads, config.per_iteration, config.max_heads,
                                             "path-patching", config.min_relative)
        timings["path_patching_seconds"] = time.perf_counter() - start
    say(0.85, "faithfulness")
    means = [circuits.batch_means(model, b) for b in evaluation]
    base = circuits.faithfulness_baselines(model, evaluation, means)
    base.require_signal()  # before any circuit is evaluated
    sizes = curve_sizes(len(circuit.heads), config.curve_every)
    methods = {"cd-t": circuit} if baseline is None else {"cd-t": circuit, "path-patching": baseline}
    draws = {size: random_circuits(model, circuit.prefix(size), config.random_draws, config.seed + size)
             for size in sizes}
    wanted = [m.prefix(size) for size in sizes for m in methods.values()] + [d for size in sizes for d in draws[size]]
    values = iter(base.of(v) for v in circuits.metrics_with_circuits(model, evaluation, means, wanted))
    curves: dict[str, list[Any]] = {name: [] for name in methods}
    for size in sizes:
        for name, found in methods.items():
            value = next(values)
            curves[name].append(value if len(found.prefix(size)) == size else None)
    curves["random_all"] = [[next(values) for _ in draws[size]] for size in sizes]
    curves["random_mean"] = [sum(v) / len(v) for v in curves["random_all"]]
    say(0.98, "accuracy")
    data = [b.texts for b in discovery]
    prov = provenance(model, "cdt", VERSION, config, data, config.seed)
    scores = HeadScores("CD-T relevance to the logit difference", "logit diff (β)",
                        result.to_output.clone(), prov, "β of logit(good) − logit(bad) with the head as the source")
    extra: dict[str, Any] = {"sweep_to_z_top": _top_edges(result), "timings": timings,
                             "task": config.task, "discovery_prompts": result.n_prompts,
                             "evaluation_prompts": sum(b.n_prompts for b in evaluation),
                             "discovery_clean_metric": result.clean_metric}
    if baseline is not None:
        extra["baseline_circuit"] = baseline.to_json()
    say(1.0, "done")
    return CDTResult(scores, circuit, sizes, curves, base.full, base.empty, tasks.accuracy(model, evaluation), prov,
                     extra)


def random_circuits(model, circuit: list, draws: int, seed: int) -> list[list]:
    """Random head sets of the circuit's size, excluding its heads while at least as many others
    remain (beyond half the model there are not enough: then drawn from all heads)."""
    size = len(circuit)
    exclude = circuit if size <= len(model.all_heads()) - size else []
    return random_head_sets(model, size, draws, exclude=exclude, seed=seed)


def _top_edges(result: circuits.Sweep, k: int = 20) -> list[tuple[str, str, float]]:
    flat = result.to_z.flatten().abs()
    order = torch.argsort(flat, descending=True)[:k]
    L, H = result.to_output.shape
    out = []
    for index in order.tolist():
        sl, sh, tl, th = index // (H * L * H), (index // (L * H)) % H, (index // H) % L, index % H
        out.append((f"L{sl}H{sh}", f"L{tl}H{th}", float(result.to_z[sl, sh, tl, th])))
    return out


def summary(result: CDTResult) -> str:
    """Plain-text account of a run: task competence, circuit, faithfulness vs random, timings."""
    acc = result.accuracy
    extra = result.extra
    lines = [
        f"task {extra.get('task', '?')}: top-1 accuracy {acc['top1_accuracy']:.2f}, mean logit diff "
        f"{acc['mean_logit_diff']:.2f} on {acc['n_prompts']} evaluation prompts; all heads mean-ablated "
        f"{result.empty_metric:.2f}",
        f"CD-T circuit ({len(result.circuit.heads)} heads, from {extra.get('discovery_prompts', '?')} discovery "
        "prompts), by iteration: " + " | ".join(" ".join(str(h) for h in it) for it in result.circuit.iterations),
        "faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) under mean ablation:",
    ]
    for index, size in enumerate(result.sizes):
        draws = result.faithfulness["random_all"][index]
        line = (f"  {size:>3} heads: CD-T {result.faithfulness['cd-t'][index]:.3f}; random circuits mean "
                f"{result.faithfulness['random_mean'][index]:.3f}, max {max(draws):.3f} ({len(draws)} draws)")
        if "path-patching" in result.faithfulness:
            value = result.faithfulness["path-patching"][index]
            line += f"; path patching {value:.3f}" if value is not None else "; path patching n/a"
        lines.append(line)
    if abs(result.full_metric - result.empty_metric) < 1e-3 * max(1.0, abs(result.full_metric)):
        lines.append("  (the full and the all-ablated model score the same: faithfulness ratios are not meaningful)")
    timings = extra.get("timings", {})
    text = f"CD-T discovery {timings.get('cdt_seconds', float('nan')):.1f} s"
    if "path_patching_seconds" in timings:
        text += (f"; path-patching baseline {timings['path_patching_seconds']:.1f} s "
                 f"({timings['path_patching_seconds'] / timings['cdt_seconds']:.1f}x slower)")
    else:
        text += "; path-patching baseline skipped (baseline=False in this preset)"
    lines.append(text)
    top = result.scores.top(5)
    lines.append("highest relevance to the logit diff: " + ", ".join(f"{h} {v:+.2f}" for h, v in top))
    return "\n".join(lines)


def figures(result: CDTResult) -> dict[str, Any]:
    from analyses.cdt import plots as figs

    n_layers, n_heads = result.relevance_to_output.n_layers, result.relevance_to_output.n_heads
    return {
        "circuit": figs.circuit_graph(result.circuit, n_layers, n_heads),
        "relevance": figs.relevance_heatmap(result.relevance_to_output.scores, "CD-T relevance to the logit difference"),
        "faithfulness": figs.faithfulness_curves(result.sizes, result.faithfulness),
    }
