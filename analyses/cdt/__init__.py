"""CD-T (contextual decomposition for transformers): exact β/γ decomposition and circuit discovery.

`run(model, CDTConfig(...))` builds the task (IOI by default), sweeps every head as a source in one
decomposition pass per source layer, runs the iterative search, evaluates faithfulness under mean
ablation (with random circuits of the same sizes) and returns a `CDTResult`; `figures(result)` draws it.
Submodules: arch (weights per architecture), rules, engine, circuits, patching (baseline), tasks,
local (word relevance vs occlusion), planted (a known two-head circuit), plots (plotly figures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from analyses.cdt import circuits, tasks
from analyses.cdt.arch import CDTError, UnsupportedArchitectureError
from analyses.cdt.circuits import Circuit
from analyses.cdt.engine import Engine, RuleOptions
from analyses.common import Progress, no_progress, provenance, random_head_sets
from probe.results import HeadScores, Provenance

VERSION = "0.1"
__all__ = ["CDTConfig", "CDTResult", "run", "figures", "CDTError", "UnsupportedArchitectureError", "Engine"]


@dataclass(frozen=True)
class CDTConfig:
    task: str = "ioi"  # ioi | successor
    templates: tuple[int, ...] = (0, 1)
    discovery_per_template: int = 2
    evaluation_per_template: int = 10
    per_iteration: int = 4
    max_heads: int = 12
    min_relative: float = 0.0
    target_mode: str = "input"  # input (q/k/v of target heads) | z
    attention_rule: str = "paper"
    product_rule: str = "relevant_only"
    stabilise: bool = True
    dtype: str = "float32"
    random_draws: int = 10
    seed: int = 0


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

    def to_json(self) -> dict[str, Any]:
        return {"relevance_to_output": self.relevance_to_output.to_json(), "circuit": self.circuit.to_json(),
                "sizes": self.sizes, "faithfulness": self.faithfulness, "full_metric": self.full_metric,
                "empty_metric": self.empty_metric, "accuracy": self.accuracy,
                "provenance": self.provenance.__dict__, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CDTResult:
        return cls(HeadScores.from_json(data["relevance_to_output"]), Circuit.from_json(data["circuit"]),
                   data["sizes"], data["faithfulness"], data["full_metric"], data["empty_metric"],
                   data["accuracy"], Provenance.from_json(data["provenance"]), data.get("extra", {}))


def _batches(model, config: CDTConfig, evaluation: bool) -> list[tasks.LogitDiffBatch]:
    if config.task == "ioi":
        n = config.evaluation_per_template if evaluation else config.discovery_per_template
        return tasks.ioi_batches(model, n, seed=config.seed + (1000 if evaluation else 0), templates=config.templates)
    if config.task == "successor":
        return tasks.successor_batches(model, seed=config.seed + (1000 if evaluation else 0))
    raise CDTError(f"Unknown task {config.task!r}; choose ioi or successor.")


def run(model, config: CDTConfig = CDTConfig(), progress: Progress | None = None) -> CDTResult:
    """Sweep, search and evaluate (see module docstring)."""
    say = progress or no_progress
    engine = Engine(model, config.dtype, RuleOptions(config.attention_rule, config.product_rule, config.stabilise))
    discovery = _batches(model, config, evaluation=False)
    evaluation = _batches(model, config, evaluation=True)
    result = circuits.sweep(engine, discovery, progress=lambda f, m: say(0.8 * f, m))
    circuit = circuits.iterative_search(circuits.cdt_score_fn(result, config.target_mode), model.n_layers,
                                        model.n_heads, config.per_iteration, config.max_heads, "cd-t",
                                        config.min_relative)
    say(0.85, "faithfulness")
    means = [circuits.batch_means(model, b) for b in evaluation]
    base = circuits.faithfulness_baselines(model, evaluation, means)
    sizes = list(range(1, len(circuit.heads) + 1))
    curves: dict[str, list[Any]] = {"cd-t": [], "random_mean": [], "random_all": []}
    for size in sizes:
        curves["cd-t"].append(base.of(circuits.metric_with_circuit(model, evaluation, means, circuit.prefix(size))))
        draws = random_head_sets(model, size, config.random_draws, exclude=[], seed=config.seed + size)
        values = [base.of(circuits.metric_with_circuit(model, evaluation, means, d)) for d in draws]
        curves["random_all"].append(values)
        curves["random_mean"].append(sum(values) / len(values))
    data = [b.texts for b in discovery]
    prov = provenance(model, "cdt", VERSION, config, data, config.seed)
    scores = HeadScores("CD-T relevance to the logit difference", "logit diff (β)",
                        result.to_output.clone(), prov, "β of logit(IO) − logit(S) with the head as the source")
    return CDTResult(scores, circuit, sizes, curves, base.full, base.empty, tasks.accuracy(model, evaluation), prov,
                     {"sweep_to_z_top": _top_edges(result)})


def _top_edges(result: circuits.Sweep, k: int = 20) -> list[tuple[str, str, float]]:
    flat = result.to_z.flatten().abs()
    order = torch.argsort(flat, descending=True)[:k]
    L, H = result.to_output.shape
    out = []
    for index in order.tolist():
        sl, sh, tl, th = index // (H * L * H), (index // (L * H)) % H, (index // H) % L, index % H
        out.append((f"L{sl}H{sh}", f"L{tl}H{th}", float(result.to_z[sl, sh, tl, th])))
    return out


def figures(result: CDTResult) -> dict[str, Any]:
    from analyses.cdt import plots as figs

    n_layers, n_heads = result.relevance_to_output.n_layers, result.relevance_to_output.n_heads
    return {
        "circuit": figs.circuit_graph(result.circuit, n_layers, n_heads),
        "relevance": figs.relevance_heatmap(result.relevance_to_output.scores, "CD-T relevance to the logit difference"),
        "faithfulness": figs.faithfulness_curves(result.sizes, result.faithfulness),
    }
