"""Head-level relevance sweeps, the iterative CD-T circuit search, and faithfulness under mean ablation.

One sweep decomposes every head as a source (β = its output minus its mean over the mean-source
prompts, at every position; γ = the mean) and reads, in the same pass, its relevance to every later
head's inputs (q, k, v), to every later head's output z, and to the task's logit difference. Cost:
one two-stream pass per source layer (all heads of the layer and all prompts as batch rows), from
that layer's cached residual stream onwards.

Relevance to a target vector t (a head's q/k/v or z, on one prompt, all positions):
    dot(β_t, t − μ_t) / ‖t − μ_t‖²     (the code's `dot` metric, normalised: the share of the target's
                                        deviation from its mean μ_t that the source causes)
Relevance to the output: β of logit(good) − logit(bad) at the last position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from analyses.cdt import rules
from analyses.cdt.arch import CDTError
from analyses.cdt.engine import Engine, Hooks
from analyses.cdt.rules import Pair
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.interventions import intervene, mean_ablation

COMPONENTS = ("q", "k", "v")


@dataclass
class SweepActivations:
    """Clean activations of a batch and their per-position means over its mean-source prompts (per layer)."""

    resid_pre: list[torch.Tensor]  # [P, T, d_model]
    z: list[torch.Tensor]  # [P, T, H, d_head]
    z_mean: list[torch.Tensor]  # [T, H, d_head]
    qkv: dict[str, list[torch.Tensor]]  # clean q [P,T,H,dh], k/v [P,T,KV,dh]
    qkv_mean: dict[str, list[torch.Tensor]]  # [T, H or KV, dh]


def _names(n_layers: int) -> set[str]:
    names = set()
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_q",
                  f"blocks.{layer}.attn.hook_k", f"blocks.{layer}.attn.hook_v"}
    return names


@torch.no_grad()
def sweep_activations(model, batch: LogitDiffBatch, dtype: torch.dtype = torch.float32) -> SweepActivations:
    """Cache the clean run of `batch.ids` and the mean run of `batch.mean_source_ids` (one bridge call each)."""
    names = _names(model.n_layers)
    _, clean = model.bridge.run_with_cache(batch.ids, names_filter=lambda n: n in names)
    _, mean_run = model.bridge.run_with_cache(batch.mean_source_ids,
                                              names_filter=lambda n: n in {x for x in names if "resid" not in x})
    L = model.n_layers

    def get(cache, name):
        return cache[name].to(dtype)

    return SweepActivations(
        resid_pre=[get(clean, f"blocks.{l}.hook_resid_pre") for l in range(L)],
        z=[get(clean, f"blocks.{l}.attn.hook_z") for l in range(L)],
        z_mean=[get(mean_run, f"blocks.{l}.attn.hook_z").mean(0) for l in range(L)],
        qkv={c: [get(clean, f"blocks.{l}.attn.hook_{c}") for l in range(L)] for c in COMPONENTS},
        qkv_mean={c: [get(mean_run, f"blocks.{l}.attn.hook_{c}").mean(0) for l in range(L)] for c in COMPONENTS},
    )


def _normalised_dot(beta: torch.Tensor, deviation: torch.Tensor, n_src: int) -> torch.Tensor:
    """beta `[S*P, T, H, d]`, deviation `[P, T, H, d]` → `[S, P, H]`: dot / ‖deviation‖² per head."""
    P = deviation.shape[0]
    b = beta.reshape(n_src, P, *beta.shape[1:])
    dots = torch.einsum("sptha,ptha->sph", b, deviation)
    norms = deviation.pow(2).sum((1, 3)).clamp_min(1e-12)  # [P, H]
    return dots / norms


class _SweepHooks(Hooks):
    """Inject one source head per row group at `layer`; read relevance at every later head."""

    def __init__(self, layer: int, activations: SweepActivations, n_heads: int, n_kv: int, sources: Sequence[int],
                 out_heads: torch.Tensor, out_inputs: dict[str, torch.Tensor]) -> None:
        self.layer, self.activations, self.sources = layer, activations, list(sources)
        self.n_heads, self.n_kv = n_heads, n_kv
        self.out_heads, self.out_inputs = out_heads, out_inputs  # [S, P, L, H] and per component

    def on_qkv(self, layer: int, q: Pair, k: Pair, v: Pair) -> None:
        if layer <= self.layer:
            return
        S = len(self.sources)
        for name, pair in (("q", q), ("k", k), ("v", v)):
            deviation = self.activations.qkv[name][layer] - self.activations.qkv_mean[name][layer]
            self.out_inputs[name][:, :, layer, : pair[0].shape[2]] = _normalised_dot(pair[0], deviation, S)

    def on_z(self, layer: int, z: Pair) -> Pair:
        S = len(self.sources)
        if layer == self.layer:
            beta, gamma = z[0].clone(), z[1].clone()
            P = self.activations.z[layer].shape[0]
            total = beta + gamma
            mean = self.activations.z_mean[layer]  # [T, H, d]
            for group, head in enumerate(self.sources):
                rows = slice(group * P, (group + 1) * P)
                beta[rows, :, head] = total[rows, :, head] - mean[:, head]
                gamma[rows, :, head] = mean[:, head].expand_as(total[rows, :, head])
            return beta, gamma
        if layer > self.layer:
            deviation = self.activations.z[layer] - self.activations.z_mean[layer]
            self.out_heads[:, :, layer] = _normalised_dot(z[0], deviation, S)
        return z


def logit_diff_pair(engine: Engine, normed: Pair, good: torch.Tensor, bad: torch.Tensor, n_src: int) -> Pair:
    """(β, γ) of logit(good) − logit(bad) at the last position; rows are (source, prompt) pairs."""
    P = good.shape[0]
    columns = torch.stack([good, bad], dim=1)  # [P, 2]
    W = engine.w.W_U[:, columns].to(engine.dtype)  # [d, P, 2]
    nb = normed[0][:, -1].reshape(n_src, P, -1)
    ng = normed[1][:, -1].reshape(n_src, P, -1)
    lb = torch.einsum("spd,dpc->spc", nb, W)
    lg = torch.einsum("spd,dpc->spc", ng, W)
    if engine.w.b_U is not None:
        lb, lg = rules.split_bias(lb, lg, engine.w.b_U[columns].to(engine.dtype))
    if engine.w.logit_softcap:
        cap = engine.w.logit_softcap
        lb, lg = rules.activation((lb, lg), lambda x: torch.tanh(x / cap) * cap)
    return lb[..., 0] - lb[..., 1], lg[..., 0] - lg[..., 1]


@dataclass
class Sweep:
    """Relevance of every head (source) to every later head and to the output, averaged over prompts.

    to_output[l, h]: β of the logit difference. to_z[l, h, l', h']: normalised dot at z of (l', h').
    to_input[c][l, h, l', h']: normalised dot at component c (q per query head; k, v per KV head
    expanded to the query heads that read it). clean_metric: the full model's mean logit difference.
    """

    to_output: torch.Tensor
    to_z: torch.Tensor
    to_input: dict[str, torch.Tensor]
    clean_metric: float
    n_prompts: int
    z_means: list[dict[Head, torch.Tensor]] | None = None  # per batch: mean-source mean z [T, d_head] per head

    def to_target(self, target: Head, mode: str = "input") -> torch.Tensor:
        """`[L, H]` relevance of every source head to `target` (0 for heads not upstream of it)."""
        if mode == "z":
            return self.to_z[:, :, target.layer, target.head]
        return sum(self.to_input[c][:, :, target.layer, target.head].abs() for c in COMPONENTS)  # type: ignore[return-value]


@torch.no_grad()
def sweep(engine: Engine, batches: Sequence[LogitDiffBatch], source_layers: Sequence[int] | None = None,
          progress: Callable[[float, str], None] | None = None) -> Sweep:
    """One decomposition pass per (batch, source layer): all heads of the layer × all prompts as rows."""
    model = engine.model
    L, H, KV = engine.w.n_layers, engine.w.n_heads, engine.w.n_kv_heads
    layers = list(range(L)) if source_layers is None else list(source_layers)
    to_output = torch.zeros(L, H, dtype=torch.float64)
    to_z = torch.zeros(L, H, L, H, dtype=torch.float64)
    to_input = {c: torch.zeros(L, H, L, H, dtype=torch.float64) for c in COMPONENTS}
    total_prompts = sum(b.n_prompts for b in batches)
    clean = 0.0
    steps = len(batches) * len(layers)
    done = 0
    for batch in batches:
        activations = sweep_activations(model, batch, engine.dtype)
        P = batch.n_prompts
        weight = P / total_prompts
        logits = model.logits(batch.ids, positions="last")[:, -1]
        rows = torch.arange(P)
        clean += float((logits[rows, batch.good] - logits[rows, batch.bad]).sum()) / total_prompts
        for layer in layers:
            out_heads = torch.zeros(H, P, L, H, dtype=engine.dtype)
            out_inputs = {c: torch.zeros(H, P, L, H if c == "q" else KV, dtype=engine.dtype) for c in COMPONENTS}
            hooks = _SweepHooks(layer, activations, H, KV, range(H), out_heads, out_inputs)
            start = activations.resid_pre[layer].repeat(H, 1, 1)
            resid = engine.propagate((torch.zeros_like(start), start), layer, None, hooks)
            normed = engine.apply_final_norm(resid)
            beta_metric, _ = logit_diff_pair(engine, normed, batch.good, batch.bad, H)
            to_output[layer] += weight * beta_metric.mean(1).double()
            to_z[layer] += weight * out_heads.mean(1).double()
            for c in COMPONENTS:
                values = out_inputs[c].mean(1).double()  # [H, L, H or KV]
                if c != "q" and KV != H:
                    values = values.repeat_interleave(H // KV, dim=2)
                to_input[c][layer] += weight * values
            done += 1
            if progress:
                progress(done / steps, f"CD-T sweep {batch.name}: source layer {layer}")
    return Sweep(to_output, to_z, to_input, clean, total_prompts)


# ---- iterative search ----------------------------------------------------------------------------

@dataclass
class Circuit:
    """Heads in discovery order, with the score that selected each, and scored edges."""

    method: str
    heads: list[Head]
    scores: dict[Head, float]
    iterations: list[list[Head]]
    edges: list[tuple[str, str, float]] = field(default_factory=list)  # (source, target|"logits", score)

    def prefix(self, size: int) -> list[Head]:
        return self.heads[:size]

    def to_json(self) -> dict:
        return {"method": self.method, "heads": [str(h) for h in self.heads],
                "scores": {str(h): s for h, s in self.scores.items()},
                "iterations": [[str(h) for h in it] for it in self.iterations],
                "edges": [list(e) for e in self.edges]}

    @classmethod
    def from_json(cls, data: dict) -> Circuit:
        return cls(data["method"], [Head.parse(h) for h in data["heads"]],
                   {Head.parse(h): s for h, s in data["scores"].items()},
                   [[Head.parse(h) for h in it] for it in data["iterations"]],
                   [tuple(e) for e in data["edges"]])


# score_fn(targets) -> (scores [L, H] for every candidate sender (NaN = not a candidate),
#                       per-target edge scores {target: [L, H]})
ScoreFn = Callable[[list[Head] | None], tuple[torch.Tensor, dict[str, torch.Tensor]]]


# circuit_metric(circuits) -> for each circuit (a head list), the task metric with every head outside
# it mean-ablated (on the discovery prompts); `metrics_with_circuits` batches them
CircuitMetric = Callable[[list[list[Head]]], list[float]]


def _prune_and_refill(ranked: list[Head], kept: list[Head], want: int, metric: CircuitMetric,
                      lookahead: int) -> list[Head]:
    """Alg. 1's greedy pruning, per iteration: take the top `want` candidates; while removing one of
    them raises the circuit's metric, remove the one that raises it most; then, while fewer than
    `want` are kept, add the next candidate (among the first `lookahead` ranked) that raises the
    metric most, if any does. Each round scores all its trial circuits in one batched call."""
    chosen = list(ranked[:want])
    best = metric([kept + chosen])[0]
    while len(chosen) > 1:
        values = metric([kept + [h for h in chosen if h != head] for head in chosen])
        index = max(range(len(values)), key=values.__getitem__)
        if values[index] <= best:
            break
        best = values[index]
        chosen.pop(index)
    pool = [h for h in ranked[want:lookahead]]
    while len(chosen) < want and pool:
        values = metric([kept + chosen + [head] for head in pool])
        index = max(range(len(values)), key=values.__getitem__)
        if values[index] <= best:
            break
        best = values[index]
        chosen.append(pool.pop(index))
    return chosen


def iterative_search(score_fn: ScoreFn, n_layers: int, n_heads: int, per_iteration: int, max_heads: int,
                     method: str, min_relative: float = 0.0, circuit_metric: CircuitMetric | None = None,
                     lookahead: int = 2, upstream_only: bool = True) -> Circuit:
    """Alg. 1: score senders against the current targets, keep the top `per_iteration` by |score|
    (and only those with |score| ≥ `min_relative` × the best one: the outliers), make them the next
    targets; stop at `max_heads` or when no sender is upstream of the targets.

    With `circuit_metric`, each iteration's picks are greedily pruned and refilled from the next
    `lookahead × per_iteration` ranked candidates (`_prune_and_refill`; `lookahead=1`: pruning only).
    `upstream_only=False` (node-level scores such as EAP, which have no per-target scores): later
    iterations take the next ranked heads, wherever they are."""
    heads: list[Head] = []
    scores: dict[Head, float] = {}
    iterations: list[list[Head]] = []
    edges: list[tuple[str, str, float]] = []
    targets: list[Head] | None = None
    while len(heads) < max_heads:
        values, per_target = score_fn(targets)
        ranked = []
        for layer in range(n_layers):
            for head in range(n_heads):
                value = float(values[layer, head])
                candidate = Head(layer, head)
                if value == value and candidate not in scores:
                    if targets is None or not upstream_only or any(layer < t.layer for t in targets):
                        ranked.append((abs(value), candidate, value))
        ranked.sort(key=lambda item: -item[0])
        best = ranked[0][0] if ranked else 0.0
        want = min(per_iteration, max_heads - len(heads))
        eligible = [(h, v) for magnitude, h, v in ranked if magnitude > 0 and magnitude >= min_relative * best]
        if circuit_metric is None:
            chosen = eligible[:want]
        else:
            value_of = dict(eligible)
            picked = _prune_and_refill([h for h, _ in eligible], heads, want, circuit_metric, lookahead * want)
            chosen = [(h, value_of[h]) for h in picked]
        if not chosen:
            break
        for head, value in chosen:
            heads.append(head)
            scores[head] = value
            for target, edge_scores in per_target.items():
                edges.append((str(head), target, float(edge_scores[head.layer, head.head])))
        iterations.append([h for h, _ in chosen])
        targets = [h for h, _ in chosen]
    return Circuit(method, heads, scores, iterations, edges)


def cdt_score_fn(result: Sweep, mode: str = "weighted") -> ScoreFn:
    """Scores from a finished sweep: output relevance first; then, per target t, each upstream head's
    relevance to t's inputs (|q| + |k| + |v|), combined over targets as

    - `weighted` (default): Σ_t rel_in(s → t) · |rel_out(t)|, a chain-rule estimate of the path
      s → t → logits (targets that matter more to the output count more);
    - `input`: Σ_t rel_in(s → t) / Σ_s' rel_in(s' → t) (each target normalised, equal weight);
    - `z`: as `input` but read at the target's output z (misses pure Q/K composition, docs/cdt.md)."""

    def score(targets: list[Head] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if targets is None:
            return result.to_output.clone(), {"logits": result.to_output.clone()}
        total = torch.zeros_like(result.to_output)
        per_target = {}
        for target in targets:
            values = result.to_target(target, "z" if mode == "z" else "input").clone()
            values[target.layer:] = 0.0  # only upstream heads can feed the target
            per_target[str(target)] = values
            if mode == "weighted":  # share of the target's input deviation × the target's own output relevance
                total += values.abs() * abs(float(result.to_output[target.layer, target.head]))
                continue
            norm = values.abs().sum()
            if norm > 0:
                total += values.abs() / norm
        return total, per_target

    return score


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def batch_means(model, batch: LogitDiffBatch) -> dict[Head, torch.Tensor]:
    """Per-position mean of every head's z `[T, d_head]` over the batch's mean-source prompts (template-grouped
    mean ablation)."""
    names = {f"blocks.{l}.attn.hook_z" for l in range(model.n_layers)}
    _, cache = model.bridge.run_with_cache(batch.mean_source_ids, names_filter=lambda n: n in names)
    return {h: cache[f"blocks.{h.layer}.attn.hook_z"][:, :, h.head].mean(0) for h in model.all_heads()}


@torch.no_grad()
def metric_with_circuit(model, batches: Sequence[LogitDiffBatch], means: Sequence[dict[Head, torch.Tensor]],
                        keep: Sequence[Head] | None) -> float:
    """Mean logit difference with every head outside `keep` mean-ablated (`keep=None`: the full model)."""
    total, count = 0.0, 0
    kept = None if keep is None else set(keep)
    for batch, mu in zip(batches, means):
        ablated = [] if kept is None else [h for h in model.all_heads() if h not in kept]
        rows = torch.arange(batch.n_prompts)
        if ablated:
            with intervene(model, mean_ablation(ablated, mu)):
                logits = model.logits(batch.ids, positions="last")[:, -1]
        else:
            logits = model.logits(batch.ids, positions="last")[:, -1]
        total += float((logits[rows, batch.good] - logits[rows, batch.bad]).sum())
        count += batch.n_prompts
    return total / count


@torch.no_grad()
def metrics_with_circuits(model, batches: Sequence[LogitDiffBatch], means: Sequence[dict[Head, torch.Tensor]],
                          keeps: Sequence[Sequence[Head]], max_rows: int = 64) -> list[float]:
    """`metric_with_circuit` for several circuits at once. A forward holds (circuit, batch, prompt)
    rows of one token length (batches of equal length share forwards); each block of rows has the
    complement of its circuit mean-ablated with its own batch's means."""
    totals = [0.0] * len(keeps)
    count = sum(b.n_prompts for b in batches)
    heads = model.all_heads()
    by_length: dict[int, list[tuple[int, int]]] = {}
    for j, batch in enumerate(batches):
        for i in range(len(keeps)):
            by_length.setdefault(int(batch.ids.shape[1]), []).append((i, j))
    for jobs in by_length.values():
        packs: list[list[tuple[int, int]]] = [[]]
        rows_in_pack = 0
        for i, j in jobs:
            if packs[-1] and rows_in_pack + batches[j].n_prompts > max_rows:
                packs.append([])
                rows_in_pack = 0
            packs[-1].append((i, j))
            rows_in_pack += batches[j].n_prompts
        for pack in packs:
            ops, ids, good, bad, start = [], [], [], [], 0
            for i, j in pack:
                batch = batches[j]
                kept = set(keeps[i])
                ablated = [h for h in heads if h not in kept]
                if ablated:
                    ops.append(mean_ablation(ablated, means[j], rows=tuple(range(start, start + batch.n_prompts))))
                ids.append(batch.ids)
                good.append(batch.good)
                bad.append(batch.bad)
                start += batch.n_prompts
            with intervene(model, ops):
                logits = model.logits(torch.cat(ids), positions="last")[:, -1]
            rows = torch.arange(start)
            diff = (logits[rows, torch.cat(good)] - logits[rows, torch.cat(bad)]).tolist()
            offset = 0
            for i, j in pack:
                n = batches[j].n_prompts
                totals[i] += sum(diff[offset: offset + n])
                offset += n
    return [t / count for t in totals]


def discovery_metric(model, batches: Sequence[LogitDiffBatch],
                     means: Sequence[dict[Head, torch.Tensor]] | None = None) -> CircuitMetric:
    """The circuit metric for pruning during search: mean-ablated on the discovery prompts' own
    means (`means`, e.g. `Sweep.z_means`, or computed here)."""
    means = list(means) if means is not None else [batch_means(model, b) for b in batches]
    return lambda keeps: metrics_with_circuits(model, batches, means, keeps)


@dataclass
class Faithfulness:
    full: float
    empty: float

    @property
    def degenerate(self) -> bool:
        """The full and the all-ablated model score the same: no ratio to them means anything."""
        return abs(self.full - self.empty) <= 1e-6 * max(1.0, abs(self.full), abs(self.empty))

    def require_signal(self) -> None:
        """Raise a clear error, rather than divide by (nearly) zero, when the metric is degenerate."""
        if self.degenerate:
            raise CDTError(f"The task's metric is degenerate: the full model ({self.full:.6g}) and the "
                           f"all-ablated model ({self.empty:.6g}) score the same, so faithfulness is undefined; "
                           "use a task this model can do.")

    def of(self, value: float) -> float:
        """(m(C) − m(∅)) / (m(M) − m(∅))."""
        self.require_signal()
        return (value - self.empty) / (self.full - self.empty)


def faithfulness_baselines(model, batches, means) -> Faithfulness:
    return Faithfulness(metric_with_circuit(model, batches, means, None), metric_with_circuit(model, batches, means, []))


def prune(model, batches, means, heads: Sequence[Head]) -> list[Head]:
    """Greedy pruning (Alg. 1): drop any head whose removal raises the circuit's metric."""
    kept = list(heads)
    best = metric_with_circuit(model, batches, means, kept)
    for head in reversed(list(heads)):
        trial = [h for h in kept if h != head]
        value = metric_with_circuit(model, batches, means, trial)
        if value > best:
            kept, best = trial, value
    return kept


@dataclass
class Relevance:
    """One source head → one target head relevance, with a plain statement when it is 0 by construction."""

    value: float
    depends: bool
    note: str


@torch.no_grad()
def head_relevance(engine: Engine, batch: LogitDiffBatch, source: Head, target: Head,
                   component: str = "z") -> Relevance:
    """Relevance of `source` (all positions) to `target`'s `component` (z, q, k or v) on `batch`.

    A target that is not downstream of the source (same or earlier layer) cannot depend on it: the
    answer is 0 and says so, rather than a number that looks measured.
    """
    if component not in ("z", *COMPONENTS):
        raise ValueError(f"component must be z, q, k or v, not {component!r}")
    if target.layer <= source.layer:
        return Relevance(0.0, False, f"{target} is in layer {target.layer}, not downstream of {source} "
                                     f"(layer {source.layer}): it does not depend on the source; relevance is 0.")
    result = sweep(engine, [batch], source_layers=[source.layer])
    values = result.to_z if component == "z" else result.to_input[component]
    value = float(values[source.layer, source.head, target.layer, target.head])
    return Relevance(value, True, f"{source} → {target}.{component}: {value:.4g} of the target's deviation "
                                  "from its reference mean")
