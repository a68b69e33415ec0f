"""Factual-recall heads (Yu, Merullo, Pavlick, EMNLP 2023): memory heads vs in-context heads.

A counterfactual prompt ("The capital of Poland is London.\\nQ: What is the capital of Poland?\\nA:")
makes the model choose between copying the context city (*in-context*) and recalling the fact
(*memorised*). This module:

1. measures the behaviour: greedy generation (<= 16 tokens) scored by one scorer
   (`classify_answer`, memorised first, answer cut at the next "Q:" or newline), with 95% intervals
   from a cluster bootstrap over countries (prompts about one country are not independent); and a
   fast first-token measure (logit of the in-context first token minus that of the memorised first
   token, and which of the two is larger);
2. attributes that logit difference to every head (direct logit attribution at the last position,
   through the final norm with its scale frozen from the clean run; on Gemma-3 also through the
   post-attention norm, frozen the same way): positive = in-context head, negative = memory head;
3. steers by scaling one head's values (`probe.interventions.scale`, per query head, every position,
   every generation step): candidate heads come from attribution (top-k per direction), the head and
   factor are chosen on a tuning split with the fast measure, and reported on a held-out split of
   other countries (disjointness enforced: `check_disjoint`), with generation;
4. checks attribution causally: zero-ablating the top heads moves the fast measure more than random
   head sets of the same size, and the best scaling beats the same factor on random single heads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.common import Progress, no_progress, provenance, random_head_sets
from analyses.data.capitals import CAPITALS, Capital
from analyses.data.counterfactual import (
    TEMPLATES,
    CounterfactualDataError,
    CounterfactualPrompt,
    build_counterfactuals,
    build_plain,
    default_pool,
    split_countries,
)
from probe import batching
from probe.architecture import Norm, architecture
from probe.errors import ProbeError
from probe.generation import greedy_generate
from probe.heads import Head
from probe.interventions import Intervention, intervene, scale, zero_ablation
from probe.models import LoadedModel
from probe.readout import frozen_final_norm
from probe.results import HeadScores, Provenance, to_jsonable

ANALYZER = "factual"
VERSION = "2"
SCORER = "memorised-first, cut at 'Q:'/newline, case-insensitive whole-word match (analyses.factual.classify_answer)"
LABELS = ("in_context", "memorised", "other")


class FactualError(ProbeError):
    """A factual-recall analysis that cannot be run as configured."""


class SplitOverlapError(FactualError):
    """Held-out prompts ask about a country the heads or factors were chosen on."""


def check_disjoint(tuning: Sequence[CounterfactualPrompt], heldout: Sequence[CounterfactualPrompt]) -> None:
    """Held-out prompts must ask about countries the tuning prompts never asked about: the heads and
    the factors are chosen on the tuning facts, so a shared country would test them on what they fit."""
    shared = sorted({p.country for p in tuning} & {p.country for p in heldout})
    if shared:
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise SplitOverlapError(f"The held-out prompts ask about {len(shared)} tuning "
                                f"{'country' if len(shared) == 1 else 'countries'} ({shown}); the held-out "
                                "causal test needs countries disjoint from the tuning ones (split_countries).")


# ---- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FactualConfig:
    """Every knob, with the defaults used in docs/factual.md."""

    template: str = "plain"                 # plain | chat (chat needs a model with a chat template)
    n_tuning: int = 120                     # counterfactual prompts for attribution and the search
    n_heldout: int = 120                    # counterfactual prompts for the report
    tuning_fraction: float = 0.5            # share of countries in the tuning split
    known_only: bool = True                 # keep countries the model answers right without context
    exclude_city_states: bool = True
    table: tuple[tuple[str, str], ...] = ()  # (country, capital) rows; () = analyses.data.capitals
    max_new_tokens: int = 16
    batch_size: int = 32
    candidates_per_direction: int = 3       # top-k heads per sign of attribution enter the scaling search
    factors: tuple[float, ...] = (-5.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
    component: str = "value"                # value | output (identical for a head's direct write)
    generate_curves: bool = False           # also held-out generation at every factor (slow on CPU)
    ablate_top_k: int = 3                   # causal check: size of the ablated head sets
    random_draws: int = 5
    seed: int = 0

    def validate(self, model: LoadedModel) -> None:
        if self.template not in TEMPLATES:
            raise FactualError(f"Unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}.")
        if self.template == "chat" and not model.chat_template:
            raise FactualError(f"{model.spec} has no chat template; use template='plain'.")
        if self.n_tuning < 1 or self.n_heldout < 1:
            raise FactualError("n_tuning and n_heldout must be at least 1 (an empty split measures nothing).")
        if not self.factors:
            raise FactualError("factors is empty: give at least one scale factor.")
        if self.component not in ("value", "output"):
            raise FactualError(f"component must be 'value' or 'output', not {self.component!r}.")
        n_heads = model.n_layers * model.n_heads
        if not 1 <= self.candidates_per_direction <= n_heads:
            raise FactualError(f"candidates_per_direction must be in 1..{n_heads}.")
        if not 1 <= self.ablate_top_k <= n_heads // 2:
            raise FactualError(f"ablate_top_k must be in 1..{n_heads // 2} for {model.spec}.")


# CPU-sized settings for the demo scan (the defaults above are the full run of docs/factual.md).
QUICK = FactualConfig(n_tuning=16, n_heldout=16, max_new_tokens=8, batch_size=16, candidates_per_direction=1,
                      factors=(-2.0, 0.0, 2.0), ablate_top_k=2, random_draws=2,
                      table=tuple((c.country, c.capital) for c in CAPITALS[:60]))


# ---- behaviour -----------------------------------------------------------------------------------

def cut_answer(text: str) -> str:
    """The answer proper: leading space dropped, cut at the next 'Q:' or newline."""
    text = text.lstrip()
    for stop in ("Q:", "\n"):
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    return text.strip()


def _mentions(answer: str, name: str) -> bool:
    """Whole-word, case-insensitive: 'Rome' must not match 'Romeo', 'Niger' not 'Nigeria'."""
    return re.search(r"(?<!\w)" + re.escape(name.casefold()) + r"(?!\w)", answer.casefold()) is not None


def classify_answer(generated: str, capital_names: Sequence[str], context_city: str) -> str:
    """'memorised' if any name of the true capital occurs (it takes precedence, as in the paper's
    check_answers.py), else 'in_context' if the context city occurs, else 'other'."""
    answer = cut_answer(generated)
    if any(_mentions(answer, name) for name in capital_names):
        return "memorised"
    if context_city and _mentions(answer, context_city):
        return "in_context"
    return "other"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (honest at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        raise FactualError("A rate over zero prompts is undefined (empty split).")
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
        raise FactualError(f"{len(values)} values but {len(clusters)} cluster labels.")
    if not values:
        raise FactualError("A rate over zero prompts is undefined (empty split).")
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


@dataclass
class Rates:
    """Generation rates over a prompt set: counts, rates and 95% intervals per label.

    With `clusters` (each prompt's country; at least two distinct), intervals are a cluster bootstrap
    over countries (`cluster_bootstrap_interval`); otherwise (one prompt per country, or no clusters)
    Wilson intervals over prompts."""

    n: int
    counts: dict[str, int]
    examples: list[str] = field(default_factory=list)  # a few cut answers, for the report
    labels: list[str] = field(default_factory=list)     # per prompt (with clusters: for the bootstrap)
    clusters: list[str] = field(default_factory=list)   # per prompt: its country
    seed: int = 0

    def rate(self, label: str) -> float:
        return self.counts[label] / self.n

    @property
    def interval_method(self) -> str:
        clustered = len(self.labels) == self.n and len(set(self.clusters)) >= 2 and len(self.clusters) > len(set(self.clusters))
        return "cluster bootstrap over countries" if clustered else "Wilson"

    def interval(self, label: str) -> tuple[float, float]:
        if self.interval_method == "Wilson":
            return wilson_interval(self.counts[label], self.n)
        return cluster_bootstrap_interval([float(x == label) for x in self.labels], self.clusters, seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "counts": dict(self.counts), "examples": list(self.examples),
                "rates": {k: self.rate(k) for k in LABELS},
                "intervals": {k: list(self.interval(k)) for k in LABELS},
                "interval_method": self.interval_method, "n_clusters": len(set(self.clusters)),
                "labels": list(self.labels), "clusters": list(self.clusters), "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rates:
        return cls(int(data["n"]), {k: int(v) for k, v in data["counts"].items()}, list(data.get("examples", [])),
                   list(data.get("labels", [])), list(data.get("clusters", [])), int(data.get("seed", 0)))


def rates_from_labels(labels: Sequence[str], answers: Sequence[str] = (), clusters: Sequence[str] = (),
                      seed: int = 0) -> Rates:
    if not labels:
        raise FactualError("No prompts to measure (empty split).")
    if clusters and len(clusters) != len(labels):
        raise FactualError(f"{len(labels)} labels but {len(clusters)} cluster names.")
    return Rates(len(labels), {k: sum(label == k for label in labels) for k in LABELS},
                 [cut_answer(a) for a in answers[:5]], list(labels), list(clusters), seed)


@dataclass
class FastRates:
    """First-token measure: d = logit(in-context first token) - logit(memorised first token).

    `prefers_in_context` = share with d > 0 (the two-way choice); `argmax_*` = share whose
    next-token argmax over the whole vocabulary is that answer's first token.
    """

    n: int
    mean_logit_diff: float
    prefers_in_context: float
    argmax_in_context: float
    argmax_memorised: float
    intervals: dict[str, list[float]] = field(default_factory=dict)  # cluster bootstrap over countries

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FastRates:
        return cls(**data)


def _groups(prompts: Sequence[CounterfactualPrompt], model: LoadedModel,
            batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """Batches of equal token length (no padding, so every row is computed exactly as alone)."""
    if not prompts:
        raise FactualError("No prompts to run (empty split).")
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, prompt in enumerate(prompts):
        ids = model.encode(prompt.text)
        model.check_fits(ids.shape[-1])
        by_length.setdefault(ids.shape[-1], []).append((index, ids[0]))
    batches = []
    for length, rows in sorted(by_length.items()):
        size = batching.choose(model, length, batch_size)  # what fits in the device's free memory, <= batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batches.append(([i for i, _ in chunk], torch.stack([ids for _, ids in chunk])))
    return batches


def _as_list(interventions: Intervention | Sequence[Intervention] | None) -> list[Intervention]:
    if interventions is None:
        return []
    return [interventions] if isinstance(interventions, Intervention) else list(interventions)


@torch.no_grad()
def generate_answers(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], max_new_tokens: int = 16,
                     interventions: Intervention | Sequence[Intervention] | None = None,
                     batch_size: int = 32) -> list[str]:
    """Greedy continuations through probe's one generation path (`probe.generation.greedy_generate`:
    KV cache, interventions active at every step), cut at the end-of-text token.

    Batches hold prompts of one token length, so no row is padded: each is computed as it is alone."""
    answers = [""] * len(prompts)
    eos = model.tokenizer.eos_token_id
    stops = None if eos is None else [eos]
    def one(indices: list[int], ids: torch.Tensor) -> None:  # out-of-memory: batching halves the batch
        with intervene(model, _as_list(interventions)):
            rows = greedy_generate(model, [prompts[i].text for i in indices], max_new_tokens,
                                   batch_size=len(indices), add_special_tokens=True, stop_ids=stops or ())
        for index, new in zip(indices, rows):
            answers[index] = model.decode(new[:new.index(eos)] if eos is not None and eos in new else new)

    for indices, ids in _groups(prompts, model, batch_size):
        model.check_fits(ids.shape[-1] + max_new_tokens)
        batching.split_on_oom(one, indices, ids, what="factual generation")
    return answers


def generation_rates(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], config: FactualConfig,
                     interventions: Intervention | Sequence[Intervention] | None = None) -> Rates:
    answers = generate_answers(model, prompts, config.max_new_tokens, interventions, config.batch_size)
    labels = [classify_answer(a, p.capital_names, p.context_city) for a, p in zip(answers, prompts)]
    return rates_from_labels(labels, answers, [p.country for p in prompts], config.seed)


@torch.no_grad()
def first_token_logits(model: LoadedModel, prompts: Sequence[CounterfactualPrompt],
                       interventions: Intervention | Sequence[Intervention] | None = None,
                       batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: (logit of in-context first token, logit of memorised first token) `[n, 2]`, and argmax `[n]`."""
    pair = torch.zeros(len(prompts), 2, dtype=torch.float64)
    argmax = torch.zeros(len(prompts), dtype=torch.long)
    def one(indices: list[int], ids: torch.Tensor) -> None:  # out-of-memory: batching halves the batch
        with intervene(model, _as_list(interventions)):
            last = model.logits(ids, positions="last")[:, -1].to(torch.float64)
        for row, index in enumerate(indices):
            p = prompts[index]
            pair[index, 0] = last[row, p.in_context_token] if p.in_context_token >= 0 else float("nan")
            pair[index, 1] = last[row, p.memorised_token]
        argmax[indices] = last.argmax(-1).cpu()

    for indices, ids in _groups(prompts, model, batch_size):
        batching.split_on_oom(one, indices, ids, what="factual first-token logits")
    return pair, argmax


def fast_rates(model: LoadedModel, prompts: Sequence[CounterfactualPrompt],
               interventions: Intervention | Sequence[Intervention] | None = None,
               batch_size: int = 32, seed: int = 0) -> FastRates:
    """The first-token measure, with 95% cluster-bootstrap intervals over the prompts' countries."""
    pair, argmax = first_token_logits(model, prompts, interventions, batch_size)
    diff = pair[:, 0] - pair[:, 1]
    ic = torch.tensor([p.in_context_token for p in prompts])
    mem = torch.tensor([p.memorised_token for p in prompts])
    countries = [p.country for p in prompts]
    intervals: dict[str, list[float]] = {}
    if len(set(countries)) >= 2:
        for name, values in (("mean_logit_diff", diff), ("prefers_in_context", (diff > 0).double())):
            intervals[name] = list(cluster_bootstrap_interval(values.tolist(), countries, seed=seed))
    return FastRates(len(prompts), float(diff.mean()), float((diff > 0).double().mean()),
                     float((argmax == ic).double().mean()), float((argmax == mem).double().mean()), intervals)


# ---- head attribution ----------------------------------------------------------------------------

def _post_attention_norm(model: LoadedModel, layer: int) -> Norm | None:
    """The norm on the attention output before it joins the residual stream (Gemma 2/3, OLMo-2), if any."""
    return architecture(model).norm("ln1_post", layer)


def _hook_names(model: LoadedModel) -> set[str]:
    names = {f"blocks.{l}.attn.hook_z" for l in range(model.n_layers)} | {"ln_final.hook_scale"}
    for layer in range(model.n_layers):
        if _post_attention_norm(model, layer) is not None:
            names.add(f"blocks.{layer}.ln1_post.hook_scale")
    return names


@dataclass
class Attribution:
    """Per prompt and head: the head's direct effect on d = logit(in-context) - logit(memorised)."""

    per_prompt: torch.Tensor  # [n_prompts, n_layers, n_heads]
    clean_diff: torch.Tensor  # [n_prompts] d from the real logits

    @property
    def mean(self) -> torch.Tensor:
        return self.per_prompt.mean(0)


@torch.no_grad()
def head_attribution(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], batch_size: int = 32) -> Attribution:
    """All heads in one cached pass per batch (the fast path).

    DLA_lh = post_gain_l * (z_lh W_O[l,h]) / post_scale_l   (Gemma's post-attention norm, frozen)
             -> centred if the final norm centres (LayerNorm)
             -> * final_gain / final_scale                   (final norm, frozen from the clean run)
             . (W_U[:, in-context first token] - W_U[:, memorised first token])
    """
    counterfactual = [p for p in prompts if p.is_counterfactual]
    if len(counterfactual) != len(prompts):
        raise FactualError("Attribution needs counterfactual prompts (a context city to compare against).")
    arch = architecture(model)
    W_O = arch.W_O.to(torch.float64)  # [L, H, d_head, d_model]
    post = {}
    for layer in range(model.n_layers):
        norm = _post_attention_norm(model, layer)
        if norm is not None:
            if norm.kind != "rms":
                raise FactualError(f"{arch.name}: a {norm.kind} post-attention norm is not supported by the attribution.")
            post[layer] = norm.weight.to(W_O.device, torch.float64)
    names = _hook_names(model)
    per_prompt = torch.zeros(len(prompts), model.n_layers, model.n_heads, dtype=torch.float64)
    clean = torch.zeros(len(prompts), dtype=torch.float64)
    for indices, ids in _groups(prompts, model, batch_size):
        logits, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][:, -1].to(W_O.device) for l in range(model.n_layers)], 1)
        out = torch.einsum("blhd,lhdm->blhm", z.to(torch.float64), W_O)
        for layer, gain in post.items():
            post_scale = cache[f"blocks.{layer}.ln1_post.hook_scale"][:, -1].to(out.device, torch.float64)  # [b, 1]
            out[:, layer] = out[:, layer] * gain / post_scale[:, None, :]
        final_scale = cache["ln_final.hook_scale"][:, -1].to(out.device, torch.float64)  # [b, 1]
        out = frozen_final_norm(model, out, final_scale[:, None, None, :])  # centred for LayerNorm, x gain / scale
        rows = [prompts[i] for i in indices]
        columns = arch.W_U_columns([t for p in rows for t in (p.in_context_token, p.memorised_token)])
        direction = (columns[:, 0::2] - columns[:, 1::2]).T.to(torch.float64)  # [b, d_model]
        per_prompt[indices] = torch.einsum("blhm,bm->blh", out, direction)
        last = logits[:, -1].to(torch.float64)
        clean[indices] = torch.stack([last[r, p.in_context_token] - last[r, p.memorised_token]
                                      for r, p in enumerate(rows)])
    return Attribution(per_prompt, clean)


@torch.no_grad()
def reference_direct_effect(model: LoadedModel, prompt: CounterfactualPrompt, head: Head) -> float:
    """Slow reference: one forward pass per head with hooks, no W_O, gains or einsums of our own.

    The head's z is zeroed at the last position; every later component's output at that position is
    patched back to its clean value (so only the direct path changes); the post-attention norm scale
    (Gemma) and the final norm scale are written back to their clean values (frozen). The direct
    effect is clean d minus the d of that run, d read from the final norm's own output (`ln_final.hook_out`)
    through the two unembedding columns: before any final logit soft-cap (Gemma 2), which is not linear
    in a head's contribution (the unembedding bias cancels in the difference).
    """
    ids = model.encode(prompt.text)
    layer = head.layer
    later = [f"blocks.{k}.hook_mlp_out" for k in range(layer, model.n_layers)]
    later += [f"blocks.{k}.hook_attn_out" for k in range(layer + 1, model.n_layers)]
    frozen = ["ln_final.hook_scale"]
    if _post_attention_norm(model, layer) is not None:
        frozen.append(f"blocks.{layer}.ln1_post.hook_scale")
    keep = set(later + frozen) | {"ln_final.hook_out"}
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name in keep)
    columns = architecture(model).W_U_columns([prompt.in_context_token, prompt.memorised_token]).to(torch.float64)

    def d_of(normalized: torch.Tensor) -> float:
        pair = normalized[0, -1].to(torch.float64) @ columns
        return float(pair[0] - pair[1])

    seen: dict[str, torch.Tensor] = {}

    def grab(value: torch.Tensor, hook: Any) -> None:
        seen["out"] = value.detach().clone()

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, -1, head.head] = 0.0
        return z

    def restore(name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def hook_fn(value: torch.Tensor, hook: Any) -> torch.Tensor:
            value = value.clone()
            value[:, -1] = cache[name][:, -1]
            return value
        return hook_fn

    hooks = [(f"blocks.{layer}.attn.hook_z", zero_head)] + [(name, restore(name)) for name in later + frozen]
    hooks.append(("ln_final.hook_out", grab))
    with model.hooks(hooks):
        model.logits(ids)
    return d_of(cache["ln_final.hook_out"]) - d_of(seen["out"])


# ---- steering ------------------------------------------------------------------------------------

@dataclass
class SweepPoint:
    head: str
    factor: float
    fast: FastRates


def scale_sweep(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], heads: Sequence[Head],
                factors: Sequence[float], component: str = "value", batch_size: int = 32,
                progress: Callable[[float, str], None] = no_progress) -> list[SweepPoint]:
    """Fast measure for every (head, factor): one forward per prompt per point."""
    points = []
    total = max(1, len(heads) * len(factors))
    for i, head in enumerate(heads):
        for j, factor in enumerate(factors):
            progress((i * len(factors) + j) / total, f"scaling {head} x{factor:g}")
            points.append(SweepPoint(str(head), float(factor),
                                     fast_rates(model, prompts, scale([head], component, factor), batch_size)))
    return points


def best_point(points: Sequence[SweepPoint], direction: str) -> SweepPoint:
    """Most in-context (or most memorised) point; ties broken by the mean logit difference."""
    sign = 1.0 if direction == "in_context" else -1.0

    def key(point: SweepPoint) -> tuple[float, float]:
        share = point.fast.prefers_in_context if sign > 0 else 1.0 - point.fast.prefers_in_context
        return share, sign * point.fast.mean_logit_diff

    return max(points, key=key)


# ---- result --------------------------------------------------------------------------------------

@dataclass
class FactualResult:
    """Attribution scores plus the behaviour, the scaling search and the causal checks."""

    scores: HeadScores                      # mean DLA over the tuning prompts (+ in-context, - memory)
    provenance: Provenance
    data: dict[str, Any]                    # prompt-set notes: template, counts, drops, multi-token
    known: dict[str, Any]                   # no-context accuracy and which countries survive
    baseline: dict[str, Any]                # held-out: generation Rates + FastRates
    top_in_context: list[tuple[str, float]]
    top_memory: list[tuple[str, float]]
    sweep: list[dict[str, Any]]             # tuning split, fast measure, every candidate x factor
    best: dict[str, Any]                    # per direction: head, factor, tuning fast, held-out rates
    curves: dict[str, Any]                  # held-out curves for the chosen heads (fast, generation)
    causal: dict[str, Any]                  # ablation of top heads vs random; best scaling vs random heads
    scorer: str = SCORER
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in self.__dict__.items() if k not in ("scores", "provenance")}
        data["scores"] = self.scores.to_json()
        data["provenance"] = to_jsonable(self.provenance)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FactualResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["provenance"] = Provenance.from_json(data["provenance"])
        fields["top_in_context"] = [tuple(x) for x in data["top_in_context"]]
        fields["top_memory"] = [tuple(x) for x in data["top_memory"]]
        return cls(**fields)


def _pool(config: FactualConfig) -> list[Capital]:
    if not config.table:
        return default_pool(config.exclude_city_states)
    return [Capital(country, capital) for country, capital in config.table]


def _known_countries(model: LoadedModel, pool: Sequence[Capital], config: FactualConfig,
                     formatter: Callable[[str], str] | None) -> tuple[list[Capital], dict[str, Any]]:
    """No-context generation per country; keep the ones answered with the true capital."""
    plain = build_plain(model.tokenizer, pool, config.template, formatter)
    if not plain.prompts:
        raise FactualError("No country's capital is known to the tokenizer.")
    answers = generate_answers(model, plain.prompts, config.max_new_tokens, None, config.batch_size)
    labels = [classify_answer(a, p.capital_names, "") for a, p in zip(answers, plain.prompts)]
    known = {p.country for p, label in zip(plain.prompts, labels) if label == "memorised"}
    rates = rates_from_labels(labels, answers)
    info = {"n_countries": len(plain.prompts), "n_known": len(known),
            "accuracy": rates.rate("memorised"), "interval": list(rates.interval("memorised")),
            "unknown_token": plain.dropped_unknown_token,
            "known_countries": sorted(known)}
    if not config.known_only:
        return [c for c in pool if c.capital not in plain.dropped_unknown_token], info
    return [c for c in pool if c.country in known], info


def _random_effects(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], sets: Sequence[Sequence[Head]],
                    make: Callable[[Sequence[Head]], Intervention], batch_size: int) -> list[FastRates]:
    return [fast_rates(model, prompts, make(heads), batch_size) for heads in sets]


def run(model: LoadedModel, config: FactualConfig = FactualConfig(), progress: Progress | None = None) -> FactualResult:
    """The whole analysis (see the module docstring); pure: no printing, no Streamlit."""
    say = progress or no_progress
    config.validate(model)
    notes: list[str] = []
    formatter = model.chat_prompt if config.template == "chat" else None
    pool = _pool(config)
    if len(pool) < 4:
        raise FactualError(f"Need at least 4 countries, got {len(pool)}.")

    say(0.0, "no-context questions: which capitals does the model know?")
    usable, known = _known_countries(model, pool, config, formatter)
    if len(usable) < 2:
        raise FactualError(f"{model.spec} answers only {len(usable)} of {len(pool)} capitals without context; "
                           "set known_only=False to study it anyway.")
    tuning_countries, heldout_countries = split_countries(usable, config.tuning_fraction, config.seed)
    try:
        tuning = build_counterfactuals(model.tokenizer, tuning_countries, config.n_tuning, config.seed,
                                       config.template, formatter, context_pool=pool)
        heldout = build_counterfactuals(model.tokenizer, heldout_countries, config.n_heldout, config.seed + 1,
                                        config.template, formatter, context_pool=pool)
    except CounterfactualDataError as error:
        raise FactualError(str(error)) from error
    check_disjoint(tuning.prompts, heldout.prompts)
    data = {"tuning": tuning.notes(), "heldout": heldout.notes(),
            "n_tuning_countries": len(tuning_countries), "n_heldout_countries": len(heldout_countries),
            "first_token_rule": "plain: first token of ' ' + city; chat: first token of the bare city"}
    for name, split in (("tuning", tuning), ("held-out", heldout)):
        if split.n_multi_token:
            notes.append(f"{split.n_multi_token} of {len(split.prompts)} {name} prompts have a multi-token answer: "
                         "logit measures use its first token only.")

    say(0.1, "baseline behaviour on the held-out split")
    baseline = {"generation": generation_rates(model, heldout.prompts, config).to_json(),
                "fast": fast_rates(model, heldout.prompts, None, config.batch_size).to_json(),
                "tuning_fast": fast_rates(model, tuning.prompts, None, config.batch_size).to_json()}

    say(0.2, "head attribution on the tuning split")
    attribution = head_attribution(model, tuning.prompts, config.batch_size)
    mean = attribution.mean
    prov = provenance(model, ANALYZER, VERSION, config,
                      {"tuning": [p.text for p in tuning.prompts], "heldout": [p.text for p in heldout.prompts]},
                      config.seed)
    scores = HeadScores("factual_dla", "logit(in-context) - logit(memorised), direct, per head",
                        mean.to(torch.float32), prov,
                        "Mean direct logit attribution at the last position over the tuning prompts; "
                        "> 0 promotes the context city (in-context head), < 0 the true capital (memory head).")
    k = config.candidates_per_direction
    top_ic = [(str(h), s) for h, s in scores.top(k, largest=True) if s > 0]
    top_mem = [(str(h), s) for h, s in scores.top(k, largest=False) if s < 0]
    candidates = list(dict.fromkeys(Head.parse(h) for h, _ in top_ic + top_mem))
    if not candidates:
        raise FactualError("Every head's attribution is zero: nothing to steer (is the model degenerate?).")

    say(0.3, "scaling search on the tuning split (fast measure)")
    sweep = scale_sweep(model, tuning.prompts, candidates, config.factors, config.component, config.batch_size,
                        lambda f, m: say(0.3 + 0.3 * f, m))
    best: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for index, direction in enumerate(("in_context", "memorised")):
        point = best_point(sweep, direction)
        head = Head.parse(point.head)
        say(0.6 + 0.1 * index, f"held-out check of {head} x{point.factor:g} ({direction})")
        intervention = scale([head], config.component, point.factor)
        best[direction] = {"head": point.head, "factor": point.factor, "tuning_fast": point.fast.to_json(),
                           "heldout_fast": fast_rates(model, heldout.prompts, intervention,
                                                      config.batch_size).to_json(),
                           "heldout_generation": generation_rates(model, heldout.prompts, config,
                                                                  intervention).to_json()}
        if point.head not in curves:
            curve = {"fast": [], "generation": []}
            for factor in config.factors:
                move = scale([head], config.component, factor)
                curve["fast"].append(fast_rates(model, heldout.prompts, move, config.batch_size).to_json())
                if config.generate_curves:
                    curve["generation"].append(generation_rates(model, heldout.prompts, config, move).to_json())
            curves[point.head] = {"factors": list(config.factors), **curve}

    say(0.85, "causal checks against random heads")
    causal = causal_checks(model, heldout.prompts, tuning=tuning.prompts,
                           top_ic_heads=[h for h, _ in scores.top(config.ablate_top_k, True)],
                           top_mem_heads=[h for h, _ in scores.top(config.ablate_top_k, False)],
                           best=best, config=config, baseline=FastRates.from_json(baseline["fast"]))
    say(1.0, "done")
    return FactualResult(scores=scores, provenance=prov, data=data, known=known, baseline=baseline,
                         top_in_context=top_ic, top_memory=top_mem,
                         sweep=[{"head": p.head, "factor": p.factor, **p.fast.to_json()} for p in sweep],
                         best=best, curves=curves, causal=causal, notes=notes)


def causal_checks(model: LoadedModel, prompts: Sequence[CounterfactualPrompt], top_ic_heads: Sequence[Head],
                  top_mem_heads: Sequence[Head], best: dict[str, Any], config: FactualConfig,
                  baseline: FastRates, tuning: Sequence[CounterfactualPrompt]) -> dict[str, Any]:
    """Attribution checked by intervention, on held-out prompts, with the fast measure.

    `tuning` are the prompts the heads and factors were chosen on: `prompts` must ask about other
    countries (`check_disjoint`, a `SplitOverlapError` otherwise).

    - Zero-ablating the top in-context heads should lower d (mean logit difference) more than ablating
      random sets of the same size; zero-ablating the top memory heads should raise it more.
    - The chosen scaling should move d more than the same factor on random single heads.
    Random sets exclude every head under test (`random_head_sets`).
    """
    check_disjoint(tuning, prompts)
    out: dict[str, Any] = {"measure": "change in mean logit(in-context) - logit(memorised) vs baseline",
                           "baseline_mean_logit_diff": baseline.mean_logit_diff,
                           "n_tuning_countries": len({p.country for p in tuning}),
                           "n_heldout_countries": len({p.country for p in prompts})}
    exclude = list(dict.fromkeys(list(top_ic_heads) + list(top_mem_heads)))
    for name, heads, sign in (("ablate_in_context_heads", top_ic_heads, -1.0),
                              ("ablate_memory_heads", top_mem_heads, 1.0)):
        found = fast_rates(model, prompts, zero_ablation(list(heads)), config.batch_size)
        sets = random_head_sets(model, len(heads), config.random_draws, exclude, config.seed + 7)
        randoms = _random_effects(model, prompts, sets, lambda hs: zero_ablation(list(hs)), config.batch_size)
        found_shift = found.mean_logit_diff - baseline.mean_logit_diff
        random_shifts = [r.mean_logit_diff - baseline.mean_logit_diff for r in randoms]
        out[name] = {"heads": [str(h) for h in heads], "expected_sign": sign, "shift": found_shift,
                     "fast": found.to_json(), "random_sets": [[str(h) for h in s] for s in sets],
                     "random_shifts": random_shifts,
                     "beats_all_random": all(sign * found_shift > sign * r for r in random_shifts)}
    for direction, sign in (("in_context", 1.0), ("memorised", -1.0)):
        choice = best[direction]
        head = Head.parse(choice["head"])
        sets = random_head_sets(model, 1, config.random_draws, exclude + [head], config.seed + 11)
        randoms = _random_effects(model, prompts, sets,
                                  lambda hs: scale(list(hs), config.component, choice["factor"]), config.batch_size)
        shift = choice["heldout_fast"]["mean_logit_diff"] - baseline.mean_logit_diff
        random_shifts = [r.mean_logit_diff - baseline.mean_logit_diff for r in randoms]
        out[f"scale_{direction}"] = {"head": choice["head"], "factor": choice["factor"], "expected_sign": sign,
                                     "shift": shift, "random_heads": [str(s[0]) for s in sets],
                                     "random_shifts": random_shifts,
                                     "beats_all_random": all(sign * shift > sign * r for r in random_shifts)}
    return out


# ---- figures -------------------------------------------------------------------------------------

def figures(result: FactualResult) -> dict[str, go.Figure]:
    """Attribution heatmap, top-head bars, rate-vs-scale curves (held-out, cluster-bootstrap intervals)."""
    scores = result.scores.scores.to(torch.float64)
    limit = float(scores.abs().max()) or 1.0
    heat = go.Figure(go.Heatmap(z=scores.tolist(), zmid=0.0, zmin=-limit, zmax=limit, colorscale="RdBu",
                                colorbar={"title": "DLA"},
                                hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>"))
    heat.update_layout(title="Direct attribution to logit(in-context) - logit(memorised) "
                             "(blue: in-context heads, red: memory heads)",
                       xaxis_title="head", yaxis_title="layer")

    bars_rows = list(reversed(result.top_memory)) + list(result.top_in_context)
    bars = go.Figure(go.Bar(x=[s for _, s in bars_rows], y=[h for h, _ in bars_rows], orientation="h",
                            marker_color=["#b2182b" if s < 0 else "#2166ac" for _, s in bars_rows]))
    bars.update_layout(title="Top memory (red) and in-context (blue) heads", xaxis_title="mean DLA",
                       yaxis={"type": "category"})

    curves = make_subplots(rows=1, cols=max(1, len(result.curves)),
                           subplot_titles=[f"scale {h}" for h in result.curves])
    for col, (head, curve) in enumerate(result.curves.items(), start=1):
        factors = curve["factors"]
        if curve.get("generation"):
            for label, colour in (("in_context", "#2166ac"), ("memorised", "#b2182b"), ("other", "#888888")):
                rates = [Rates.from_json(r) for r in curve["generation"]]
                values = [r.rate(label) for r in rates]
                low = [v - r.interval(label)[0] for v, r in zip(values, rates)]
                high = [r.interval(label)[1] - v for v, r in zip(values, rates)]
                curves.add_trace(go.Scatter(x=factors, y=values, mode="lines+markers", name=f"{label} ({head})",
                                            line={"color": colour},
                                            error_y={"type": "data", "symmetric": False, "array": high,
                                                     "arrayminus": low}), row=1, col=col)
        fast = [f["prefers_in_context"] for f in curve["fast"]]
        bounds = [f["intervals"]["prefers_in_context"] if f.get("intervals", {}).get("prefers_in_context")
                  else wilson_interval(round(v * f["n"]), f["n"]) for v, f in zip(fast, curve["fast"])]
        curves.add_trace(go.Scatter(x=factors, y=fast, mode="lines+markers",
                                    name=f"first token prefers in-context ({head})",
                                    line={"color": "#4393c3", "dash": "dot"},
                                    error_y={"type": "data", "symmetric": False,
                                             "array": [b[1] - v for v, b in zip(fast, bounds)],
                                             "arrayminus": [v - b[0] for v, b in zip(fast, bounds)]}),
                         row=1, col=col)
        curves.update_xaxes(title_text="scale factor", row=1, col=col)
    curves.update_yaxes(title_text="rate (held-out)", range=[0, 1])
    curves.update_layout(title="Held-out rates vs the scale of the chosen heads "
                               "(95% intervals, cluster bootstrap over countries)")
    return {"attribution": heat, "top_heads": bars, "scaling": curves}


def summary(result: FactualResult) -> str:
    """A few lines for the CLI and reports."""
    base = Rates.from_json(result.baseline["generation"])
    lines = [f"template {result.data['tuning']['template']}; known capitals {result.known['n_known']}/"
             f"{result.known['n_countries']}; held-out n={base.n}",
             f"baseline: in-context {base.rate('in_context'):.2f}, memorised {base.rate('memorised'):.2f}, "
             f"other {base.rate('other'):.2f}",
             "top in-context heads: " + ", ".join(f"{h} ({s:+.2f})" for h, s in result.top_in_context),
             "top memory heads: " + ", ".join(f"{h} ({s:+.2f})" for h, s in result.top_memory)]
    for direction, choice in result.best.items():
        rates = Rates.from_json(choice["heldout_generation"])
        lines.append(f"best towards {direction}: {choice['head']} x{choice['factor']:g} -> in-context "
                     f"{rates.rate('in_context'):.2f}, memorised {rates.rate('memorised'):.2f}")
    return "\n".join(lines)
