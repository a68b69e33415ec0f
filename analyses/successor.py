"""Successor heads (Gould, Ong, Ogden, Conmy, ICLR 2024): heads whose OV circuit increments ordinal tokens.

The score is read from the weights alone. For every task token t (see `analyses.data.succession`):

    e(t)          = MLP0(norm_mlp0(W_E[t]))                     effective embedding (options below)
    logits_LH(t)  = norm_in_L(e(t)) @ W_V[L, kv(H)] @ W_O[L, H] @ norms_after @ W_U[:, task tokens]

and head (L, H) "increments" t when, among the tokens of t's own task variant, the logit of t's
successor is the largest (restricted argmax: a full-vocabulary argmax rewards copy heads). The
successor score is the share of incremented task tokens; a successor head scores above `threshold`.

Beyond the score: an index-mod-10 linear probe on the effective embeddings (leave one task out),
vector arithmetic through the top head (e(t) - d_r + d_j), and a causal check in context
(mean-ablating the top head vs random heads on "Monday, Tuesday, Wednesday," style prompts).

Norm conventions (`norm_convention`, see docs/successor.md): the norm before MLP0 is always applied
exactly (MLP0 is non-linear). Downstream of MLP0, "weight" keeps the norms' diagonal weights and
LayerNorm centring but drops the per-token RMS/LN scale, which is a positive scalar per source token
and cannot change the restricted argmax; "module" applies the norm modules themselves to e(t) and to
the head's output (the slow reference does this); "none" uses no norm after MLP0.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch
from torch import nn

from analyses.common import Progress, no_progress, provenance, random_head_sets
from analyses.data.succession import TaskSet, TokenTask, build_tasks
from probe import readout
from probe.architecture import Architecture, ArchitectureError, Norm, architecture
from probe.errors import ProbeError
from probe.forward import final_normalized
from probe.heads import Head
from probe.interventions import head_means, intervene, mean_ablation
from probe.models import LoadedModel
from probe.results import HeadScores, Provenance, to_jsonable

ANALYZER = "successor"
VERSION = "2"
NORM_CONVENTIONS = ("weight", "module", "none")


class SuccessorError(ProbeError):
    """A successor-heads analysis that cannot be run as configured."""


class UnsupportedArchitectureError(SuccessorError):
    """The architecture layer (`probe.architecture`) cannot read a component this analysis needs."""


@dataclass(frozen=True)
class SuccessorConfig:
    """Every knob of the analysis, with the defaults used in docs/successor.md."""

    number_max: int = 200               # numbers task 0..number_max (where single tokens)
    wrap_around: bool = False           # Sunday -> Monday, December -> January (cyclic tasks only)
    min_items: int = 3                  # a task variant with fewer single-token items is dropped
    tasks: tuple[str, ...] = ()         # () = all eight task classes
    variants: tuple[str, ...] = ()      # () = bare, cap, space, space_cap
    require_numbers: bool = True        # no number tokens -> NoNumberTokensError
    include_residual: bool = False      # e(t) = W_E[t] (+ attn0) + MLP0(...) instead of MLP0(...) alone
    include_attn0: bool = False         # add attention layer 0 on a one-token context before MLP0
    norm_convention: str = "weight"     # weight | module | none (after MLP0; see module docstring)
    include_biases: bool = False        # b_V, LayerNorm biases (weight convention), b_U
    threshold: float = 0.5              # successor head: score > threshold
    top_k: int = 10                     # heads listed with per-task scores
    run_probe: bool = True              # index-mod-10 probe, leave one task out
    probe_l2: float = 1e-2
    run_arithmetic: bool = True
    arithmetic_min_items: int = 10      # tasks with at least this many items (one variant)
    arithmetic_scale: float = 1.0       # e - s*d_r + s*d_j
    run_causal: bool = True
    ablate_top_k: int = 1               # how many top heads are mean-ablated together
    random_draws: int = 10              # random head sets of the same size (excluding the top heads)
    prompts_per_task: int = 6
    seed: int = 0

    def validate(self) -> None:
        if self.norm_convention not in NORM_CONVENTIONS:
            raise SuccessorError(f"norm_convention must be one of {NORM_CONVENTIONS}, not {self.norm_convention!r}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise SuccessorError(f"threshold must lie in [0, 1], not {self.threshold}.")
        if self.top_k < 1 or self.ablate_top_k < 1 or self.random_draws < 1:
            raise SuccessorError("top_k, ablate_top_k and random_draws must be at least 1.")


# ---- the model's pieces ------------------------------------------------------------------------

@dataclass
class Circuit:
    """Weights of every head's effective OV circuit, stacked over layers (row-vector convention)."""

    in_norms: list[Any]                # each layer's head-input norm (identity where the family has none)
    in_weight: torch.Tensor            # [L, d] diagonal of each head-input norm
    in_bias: torch.Tensor | None       # [L, d] (LayerNorm)
    centre: bool                       # LayerNorm models centre before the weight
    W_V: torch.Tensor                  # [L, K, d, dh]
    b_V: torch.Tensor | None           # [L, K, dh]
    W_O: torch.Tensor                  # [L, H, dh, d]
    post_norms: list[Any] | None       # Gemma 2/3, OLMo-2: post-attention norm on the attention output
    post_weight: torch.Tensor | None   # [L, d]
    final_norm: Any
    final_weight: torch.Tensor         # [d]
    final_bias: torch.Tensor | None
    unembed: torch.Tensor              # [vocab, d] (the unembedding as stored; columns of W_U are its rows)
    b_U: torch.Tensor | None
    kv_of: torch.Tensor                # [H] key/value head of each query head

    def W_U(self, ids: Sequence[int]) -> torch.Tensor:
        """Unembedding columns `[d, n]` of `ids` only (never the full vocabulary)."""
        return self.unembed[torch.as_tensor(list(ids), device=self.unembed.device)].T.float()


def _arch(model: LoadedModel) -> Architecture:
    """The model's architecture layer; a family it cannot read is this analyzer's clear error."""
    try:
        return architecture(model)
    except ArchitectureError as error:
        raise UnsupportedArchitectureError(
            f"{model.spec} ({model.architecture}): the successor analysis cannot read this model: {error}"
        ) from error


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _norm_or_identity(norm: Norm | None) -> Any:
    """A norm as a callable; a family without that norm (OLMo-2 has no pre-attention norm) reads x as is."""
    return norm if norm is not None else _identity


def build_circuit(model: LoadedModel) -> Circuit:
    """Stack every layer's OV weights and norm diagonals (weights only; no forward pass).

    Everything is read from the architecture layer (`probe.architecture`): the bridge's stacked
    per-head W_V / W_O (fused projections already split), each norm's effective diagonal (Gemma's
    1 + w included), the post-attention norm where the family has one (Gemma 2/3, OLMo-2)."""
    arch = _arch(model)
    L, d = model.n_layers, model.d_model
    ones = torch.ones(d)
    in_norms = [arch.norm("ln1", layer) for layer in range(L)]
    post = [arch.norm("ln1_post", layer) for layer in range(L)]
    has_post = all(p is not None for p in post)
    centre = any(n is not None and n.kind == "layer" for n in in_norms)
    in_bias = ([n.bias.float() for n in in_norms if n is not None and n.bias is not None]
               if centre else [])
    final = arch.final_norm
    return Circuit(
        in_norms=[_norm_or_identity(n) for n in in_norms],
        in_weight=torch.stack([n.weight.float() if n is not None else ones for n in in_norms]),
        in_bias=torch.stack(in_bias) if len(in_bias) == L else None,
        centre=centre,
        W_V=arch.W_V.float(),
        b_V=None if arch.b_V is None else arch.b_V.float(),
        W_O=arch.W_O.float(),
        post_norms=post if has_post else None,  # type: ignore[arg-type]
        post_weight=torch.stack([p.weight.float() for p in post]) if has_post else None,  # type: ignore[union-attr]
        final_norm=functools.partial(readout.final_norm, model), final_weight=readout.final_norm_weight(model).float(),
        final_bias=None if final.bias is None else final.bias.float(),
        unembed=arch.unembed_weight,
        b_U=arch.b_U,
        kv_of=arch.kv_index.clone(),
    )


@torch.no_grad()
def effective_embeddings(model: LoadedModel, token_ids: Sequence[int], include_residual: bool = False,
                         include_attn0: bool = False) -> torch.Tensor:
    """e(t) `[n, d]` for many tokens at once: block 0's MLP (with its exact norms) on the embedding.

    Through the architecture layer, for every family: the embedding as the model adds it (Gemma's
    sqrt(d) scale included), then what block 0's MLP adds to the residual (its pre-MLP norm, the MLP
    or MoE block, a post-MLP norm where the family has one). No positional embedding (GPT-2).
    `include_attn0` adds attention 0 on a one-token context first (the token attends only to itself,
    so its output is v W_O + b_O, through a post-attention norm where there is one; a parallel block's
    MLP still reads the embedding), `include_residual` adds the residual stream to MLP0's output.
    """
    arch = _arch(model)
    ids = torch.as_tensor(list(token_ids), device=model.device, dtype=torch.long)
    with model.lock:  # block 0's modules are the bridge's components (their hook points fire)
        x = arch.embed(ids).float()
        attn = arch.attn_output_one_token(0, x) if include_attn0 else None
        e = arch.mlp_block_output(0, x, attn)
        if attn is not None:
            x = x + attn
    if include_residual:
        e = e + x
    return e.float()


# ---- effective OV logits (fast path) -----------------------------------------------------------

@torch.no_grad()
def ov_logits(circuit: Circuit, inputs: torch.Tensor, target_ids: Sequence[int], convention: str = "weight",
              include_biases: bool = False) -> torch.Tensor:
    """Logits `[L, H, n, m]` of every head's effective OV circuit: `inputs` `[n, d]` -> `target_ids` (m).

    All layers and heads in a few batched products; only the m unembedding columns are formed.
    """
    X = inputs.float()
    L = circuit.W_V.shape[0]
    if convention == "module":
        X_in = torch.stack([circuit.in_norms[layer](X.to(circuit.unembed.dtype)).float() for layer in range(L)])
    elif convention == "weight":
        Xc = X - X.mean(-1, keepdim=True) if circuit.centre else X
        X_in = Xc.unsqueeze(0) * circuit.in_weight[:, None, :]
        if include_biases and circuit.in_bias is not None:
            X_in = X_in + circuit.in_bias[:, None, :]
    else:
        X_in = X.unsqueeze(0).expand(L, -1, -1)
    V = torch.einsum("lnd,lkde->lkne", X_in, circuit.W_V)
    if include_biases and circuit.b_V is not None:
        V = V + circuit.b_V[:, :, None, :]
    V = V[:, circuit.kv_of]                                                  # [L, H, n, dh]
    U = circuit.W_U(target_ids)                                              # [d, m]
    if convention == "module":
        out = torch.einsum("lhne,lhed->lhnd", V, circuit.W_O)
        if circuit.post_norms is not None:
            out = torch.stack([circuit.post_norms[layer](out[layer]) for layer in range(L)])
        logits = circuit.final_norm(out) @ U
    else:
        M = U
        if convention == "weight":
            M = circuit.final_weight[:, None] * U
            if circuit.centre:
                M = M - M.mean(0, keepdim=True)
        M = M.unsqueeze(0).expand(L, -1, -1)
        if convention == "weight" and circuit.post_weight is not None:
            M = circuit.post_weight[:, :, None] * M
        logits = V @ torch.einsum("lhed,ldm->lhem", circuit.W_O, M)
        if include_biases and convention == "weight" and circuit.final_bias is not None:
            logits = logits + (circuit.final_bias @ U)
    if include_biases and circuit.b_U is not None:
        logits = logits + circuit.b_U[torch.as_tensor(list(target_ids))]
    return logits


@dataclass
class TaskHits:
    """Restricted-argmax hits of every head on one task variant."""

    task: TokenTask
    hits: torch.Tensor        # [L, H, n_scored] bool
    rows: list[int]           # the scored items


@torch.no_grad()
def score_tasks(model: LoadedModel, task_set: TaskSet, config: SuccessorConfig,
                circuit: Circuit | None = None, embeddings: torch.Tensor | None = None) -> list[TaskHits]:
    """Hits of every head on every task variant (the fast path: no loop over tokens or heads)."""
    circuit = circuit or build_circuit(model)
    all_ids = [i for t in task_set.tasks for i in t.token_ids]
    if embeddings is None:
        embeddings = effective_embeddings(model, all_ids, config.include_residual, config.include_attn0)
    out: list[TaskHits] = []
    start = 0
    for task in task_set.tasks:
        n = len(task.token_ids)
        E = embeddings[start:start + n]
        start += n
        rows = [i for i, s in enumerate(task.successor) if s >= 0]
        logits = ov_logits(circuit, E[rows], task.token_ids, config.norm_convention, config.include_biases)
        best = logits.argmax(-1)                                              # [L, H, n_scored]
        want = torch.tensor([task.successor[i] for i in rows], device=best.device)
        out.append(TaskHits(task, best == want, rows))
    return out


# ---- slow reference (the paper's algorithm, one head and one token at a time) -----------------

@torch.no_grad()
def reference_embeddings(model: LoadedModel, token_ids: Sequence[int], include_residual: bool = False,
                         include_attn0: bool = False) -> torch.Tensor:
    """e(t) `[n, d]` read off the model's own forward, not computed: every token alone as a one-token
    context through the bridge, block 0's residual stream taken from its hook points.

    MLP0's output is `resid_post - resid_pre - attn_out` of block 0 (attention 0's output zeroed
    unless `include_attn0`; learned positions zeroed, e(t) has none). This shares nothing with
    `effective_embeddings` but the weights, so a wrong norm, scale or block order there shows here."""
    grabbed: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, hook: Any) -> None:
        grabbed[hook.name] = tensor[:, 0].detach().double().clone()

    def zero(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(tensor)

    names = {key: model.bridge.hook_dict[key].name
             for key in ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_resid_post")}
    hooks: list[tuple[str, Any]] = []
    if _arch(model).has_learned_positions and "hook_pos_embed" in model.bridge.hook_dict:
        hooks.append(("hook_pos_embed", zero))
    if not include_attn0:
        hooks.append(("blocks.0.hook_attn_out", zero))
    hooks += [(key, grab) for key in names]
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=model.device)[:, None]
    model.run_with_hooks(ids, fwd_hooks=hooks)
    pre, attn, post = (grabbed[names[k]] for k in names)
    mlp0 = post - pre - attn
    return (mlp0 + pre + attn if include_residual else mlp0).float()


@torch.no_grad()
def reference_logits(model: LoadedModel, task: TokenTask, head: Head, token_index: int,
                     config: SuccessorConfig, weights: tuple[Any, ...] | None = None,
                     embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Effective-OV logits of one head for one token over its task, from the bridge's weights.

    e(t) comes from the model's own forward (`reference_embeddings`) unless given; norms are applied
    as modules (the exact per-token computation); under the default "weight" convention the fast path
    must reach the same argmax because the dropped scales are positive.
    """
    arch = _arch(model)
    token = task.token_ids[token_index]
    e = embedding if embedding is not None else reference_embeddings(
        model, [token], config.include_residual, config.include_attn0)[0]
    if config.norm_convention == "none":
        x = e
    else:
        x = _norm_or_identity(arch.norm("ln1", head.layer))(e)
    W_V, W_O, b_V = weights or bridge_weights(model)
    kv = model.kv_head_of(head.head) if W_V.shape[1] == model.n_kv_heads else head.head
    v = x @ W_V[head.layer, kv]
    if config.include_biases and b_V is not None:
        v = v + b_V[head.layer, kv]
    out = v @ W_O[head.layer, head.head]
    if config.norm_convention != "none":
        out = _norm_or_identity(arch.norm("ln1_post", head.layer))(out)  # Gemma 2/3, OLMo-2
        out = readout.final_norm(model, out)                            # the family's own final norm
    logits = out.float() @ arch.W_U_columns(task.token_ids)             # no soft-cap: argmax-neutral, not linear
    if config.include_biases and arch.b_U is not None:
        logits = logits + arch.b_U[torch.as_tensor(task.token_ids)]
    return logits


def bridge_weights(model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W_V, W_O, b_V) as the TransformerBridge stacks them on this access (a fresh read, not the
    architecture layer's cached copy the fast path uses)."""
    bridge = model.bridge
    try:
        b_V = bridge.b_V
    except AttributeError:  # the bridge raises for a bias-free checkpoint
        b_V = None
    return bridge.W_V, bridge.W_O, b_V


def reference_scores(model: LoadedModel, task_set: TaskSet, config: SuccessorConfig,
                     heads: Sequence[Head] | None = None) -> dict[Head, float]:
    """Successor score per head by the naive loop: for each head, each task token, restricted argmax,
    with e(t) read from the model's own block 0 through hooks (`reference_embeddings`)."""
    heads = list(heads) if heads is not None else model.all_heads()
    weights = bridge_weights(model)
    embedded = {task.key: reference_embeddings(model, task.token_ids, config.include_residual, config.include_attn0)
                for task in task_set.tasks}  # one forward per task variant, from the model's hooks
    scores: dict[Head, float] = {}
    for head in heads:
        hits = total = 0
        for task in task_set.tasks:
            for index, successor in enumerate(task.successor):
                if successor < 0:
                    continue
                logits = reference_logits(model, task, head, index, config, weights, embedded[task.key][index])
                hits += int(int(torch.argmax(logits)) == successor)
                total += 1
        scores[head] = hits / total
    return scores


# ---- mod-10 probe and vector arithmetic ---------------------------------------------------------

def _unique_items(task_set: TaskSet, embeddings: torch.Tensor) -> tuple[list[int], list[int], list[str], torch.Tensor]:
    """Every distinct task token once: ids, indices, task names and effective embeddings."""
    ids, indices, tasks, rows = [], [], [], []
    seen: set[int] = set()
    position = 0
    for task in task_set.tasks:
        for token, index in zip(task.token_ids, task.indices):
            if token not in seen:
                seen.add(token)
                ids.append(token)
                indices.append(index)
                tasks.append(task.task)
                rows.append(position)
            position += 1
    return ids, indices, tasks, embeddings[rows]


def _fit_softmax_probe(X: torch.Tensor, y: torch.Tensor, n_classes: int,
                       l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L2, LBFGS) on centred, globally scaled features; returns (W, b)."""
    torch.manual_seed(0)
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([W, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(X @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return W.detach(), b.detach()


def mod10_probe(task_set: TaskSet, embeddings: torch.Tensor, l2: float = 1e-2) -> dict[str, dict[str, float]]:
    """Leave-one-task-out probe of index mod 10 on the effective embeddings.

    Chance is 0.1; `majority` is the accuracy of always answering the commonest training residue.
    """
    _, indices, tasks, E = _unique_items(task_set, embeddings)
    X = E.double()
    y = torch.tensor([i % 10 for i in indices])
    names = list(dict.fromkeys(tasks))
    mask_of = {name: torch.tensor([t == name for t in tasks]) for name in names}
    results: dict[str, dict[str, float]] = {}
    for held_out in names:
        test = mask_of[held_out]
        train = ~test
        if int(train.sum()) < 10 or len(set(y[train].tolist())) < 2:
            continue
        # One scale for all features: per-feature standardising would blow up directions that only
        # vary by noise in the training tasks (e.g. decades that only the held-out task has).
        mean = X[train].mean(0)
        std = (X[train] - mean).pow(2).sum(-1).mean().sqrt() / math.sqrt(X.shape[1]) + 1e-12
        W, b = _fit_softmax_probe((X[train] - mean) / std, y[train], 10, l2)
        predicted = (((X[test] - mean) / std) @ W + b).argmax(-1)
        commonest = int(torch.bincount(y[train], minlength=10).argmax())
        results[held_out] = {
            "accuracy": float((predicted == y[test]).double().mean()),
            "n_test": int(test.sum()), "n_train": int(train.sum()), "chance": 0.1,
            "majority": float((y[test] == commonest).double().mean()),
        }
    return results


def residue_directions(task_set: TaskSet, embeddings: torch.Tensor) -> torch.Tensor:
    """`[10, d]`: mean effective embedding of the tokens with index ≡ r (mod 10), minus the grand mean.

    Over every token (a summary for the report); `vector_arithmetic` recomputes the two class means it
    uses with the tested item and its target held out (`HeldOutMeans`)."""
    _, indices, _, E = _unique_items(task_set, embeddings)
    residues = torch.tensor([i % 10 for i in indices])
    grand = E.mean(0)
    directions = torch.zeros(10, E.shape[1])
    for r in range(10):
        if bool((residues == r).any()):
            directions[r] = E[residues == r].mean(0) - grand
    return directions


class HeldOutMeans:
    """Residue-class means of the effective embeddings with some tokens left out, from class sums.

    The caller leaves out every token of an item (task, index) in every variant (" Monday" and
    "Monday" carry the same item; " May" is a month and a month prefix), so a direction never contains
    the vector it is tested on."""

    def __init__(self, task_set: TaskSet, embeddings: torch.Tensor) -> None:
        ids, indices, _, E = _unique_items(task_set, embeddings)
        self.E = E.double()
        self.residue = torch.tensor([i % 10 for i in indices])
        self.row_of = {token: row for row, token in enumerate(ids)}
        self.sums = torch.zeros(10, E.shape[1], dtype=torch.float64)
        self.counts = torch.zeros(10, dtype=torch.long)
        for r in range(10):
            members = self.residue == r
            self.sums[r] = self.E[members].sum(0)
            self.counts[r] = int(members.sum())

    def mean(self, residue: int, held_out: Collection[int]) -> torch.Tensor | None:
        """Mean of class `residue` without the token ids `held_out`; None when nothing is left."""
        rows = sorted({self.row_of[t] for t in held_out if t in self.row_of
                       and int(self.residue[self.row_of[t]]) == residue})
        count = int(self.counts[residue]) - len(rows)
        if count <= 0:
            return None
        total = self.sums[residue] - (self.E[rows].sum(0) if rows else 0.0)
        return total / count


@torch.no_grad()
def arithmetic_trials(task_set: TaskSet, embeddings: torch.Tensor, config: SuccessorConfig,
                      hold_out: bool = True) -> list[dict[str, Any]]:
    """Per task variant with enough items: the vectors e(t) - s*m_r + s*m_j and the expected answers.

    m_r, m_j are residue-class means (the grand mean of `residue_directions` cancels in the
    difference). With `hold_out` (the default, and the only honest reading) both means leave out the
    tested item t and its target t' (the item of t's decade with residue j), in every variant:
    otherwise m_j contains e(t') itself and the arithmetic is partly told the answer.
    `hold_out=False` is the old leaky rule, kept only so a test can show the difference."""
    means = HeldOutMeans(task_set, embeddings)
    tokens_of: dict[tuple[str, int], set[int]] = defaultdict(set)  # an item's tokens in every variant
    for variant in task_set.tasks:
        for token, index in zip(variant.token_ids, variant.indices):
            tokens_of[(variant.task, index)].add(token)
    out: list[dict[str, Any]] = []
    start = 0
    for task in task_set.tasks:
        n = len(task.token_ids)
        E = embeddings[start:start + n].double()
        start += n
        if n < config.arithmetic_min_items:
            continue
        position_of = {index: i for i, index in enumerate(task.indices)}
        vectors, expected, skipped = [], [], 0
        for i, index in enumerate(task.indices):
            r = index % 10
            for j in range(10):
                target = position_of.get(index - r + j)
                if j == r or target is None or task.successor[target] < 0:
                    continue
                held = tokens_of[(task.task, index)] | tokens_of[(task.task, task.indices[target])] if hold_out else set()
                m_r, m_j = means.mean(r, held), means.mean(j, held)
                if m_r is None or m_j is None:
                    skipped += 1
                    continue
                vectors.append(E[i] - config.arithmetic_scale * m_r + config.arithmetic_scale * m_j)
                expected.append(task.successor[target])
        if vectors or skipped:
            out.append({"task": task, "vectors": torch.stack(vectors).float() if vectors else None,
                        "expected": expected, "skipped": skipped})
    return out


@torch.no_grad()
def vector_arithmetic(circuit: Circuit, task_set: TaskSet, embeddings: torch.Tensor, head: Head,
                      config: SuccessorConfig) -> list[dict[str, Any]]:
    """e(t) - s*m_r + s*m_j through `head`: success iff the top task logit is succ(item with residue j).

    The target item is the one in t's decade with residue j (23, r=3, j=7 -> 27, expected 28); the
    class means hold out t and the target (`arithmetic_trials`). `held_out_skipped` counts trials
    whose class had no other member."""
    rows: list[dict[str, Any]] = []
    for trial in arithmetic_trials(task_set, embeddings, config):
        task, expected = trial["task"], trial["expected"]
        if not expected:
            continue
        logits = ov_logits(circuit, trial["vectors"], task.token_ids, config.norm_convention,
                           config.include_biases)[head.layer, head.head]
        hits = logits.argmax(-1) == torch.tensor(expected)
        row = {"task": task.key, "trials": len(expected), "successes": int(hits.sum()),
               "rate": float(hits.double().mean()), "chance": 1.0 / len(task.token_ids)}
        if trial["skipped"]:
            row["held_out_skipped"] = trial["skipped"]
        rows.append(row)
    return rows


# ---- causal check in context -------------------------------------------------------------------

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
            states[members] = final_normalized(model, batch, positions="last")[:, -1].float().cpu()
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


# ---- the analyzer -------------------------------------------------------------------------------
@dataclass
class SuccessorResult:
    scores: HeadScores                          # successor score per head
    task_names: list[str]
    per_task: torch.Tensor                      # [T, L, H] score on each task (variants pooled)
    task_chance: dict[str, float]               # mean 1/|task variant| over scored tokens
    chance: float
    n_scored: dict[str, int]
    top_heads: list[dict[str, Any]]
    successor_heads: list[str]
    threshold: float
    mapping: list[dict[str, Any]]
    dropped: list[str]
    probe: dict[str, dict[str, float]] = field(default_factory=dict)
    arithmetic: list[dict[str, Any]] = field(default_factory=list)
    arithmetic_head: str = ""
    causal: dict[str, Any] = field(default_factory=dict)
    provenance: Provenance | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: to_jsonable(v) for k, v in asdict(self).items() if k not in ("scores", "per_task", "provenance")}
        data["scores"] = self.scores.to_json()
        data["per_task"] = self.per_task.double().tolist()
        data["provenance"] = to_jsonable(self.provenance) if self.provenance else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuccessorResult:
        fields = dict(data)
        fields["scores"] = HeadScores.from_json(data["scores"])
        fields["per_task"] = torch.tensor(data["per_task"], dtype=torch.float64)
        fields["provenance"] = Provenance.from_json(data["provenance"]) if data.get("provenance") else None
        return cls(**fields)


# CPU-sized settings for the demo scan: fewer random draws and prompts in the causal check.
QUICK = SuccessorConfig(random_draws=5, prompts_per_task=3)


def run(model: LoadedModel, config: SuccessorConfig = SuccessorConfig(),
        progress: Progress | None = None) -> SuccessorResult:
    """Score every head, then (as configured) probe, arithmetic and the causal check."""
    config.validate()
    say = progress or no_progress
    say(0.0, "building succession tasks")
    task_set = build_tasks(model.tokenizer, config.number_max, config.wrap_around, config.min_items,
                           config.tasks or None, config.variants or None, config.require_numbers)
    all_ids = [i for t in task_set.tasks for i in t.token_ids]
    say(0.1, f"effective embeddings of {len(all_ids)} task tokens")
    circuit = build_circuit(model)
    embeddings = effective_embeddings(model, all_ids, config.include_residual, config.include_attn0)
    say(0.2, "effective OV circuits of every head")
    task_hits = score_tasks(model, task_set, config, circuit, embeddings)

    L, H = model.n_layers, model.n_heads
    names = task_set.task_names
    hits_by_task = {n: torch.zeros(L, H, dtype=torch.float64) for n in names}
    count_by_task = {n: 0 for n in names}
    chance_sum = {n: 0.0 for n in names}
    for th in task_hits:
        hits_by_task[th.task.task] += th.hits.double().sum(-1).cpu()
        count_by_task[th.task.task] += len(th.rows)
        chance_sum[th.task.task] += len(th.rows) / len(th.task.token_ids)
    total = sum(count_by_task.values())
    if total == 0:
        raise SuccessorError("No task token has a single-token successor; nothing to score.")
    scores = sum(hits_by_task.values()) / total
    per_task = torch.stack([hits_by_task[n] / max(1, count_by_task[n]) for n in names])
    task_chance = {n: chance_sum[n] / max(1, count_by_task[n]) for n in names}
    chance = sum(chance_sum.values()) / total

    prov = provenance(model, ANALYZER, VERSION, config, task_set.mapping(), config.seed)
    head_scores = HeadScores("successor score", "share of task tokens whose successor wins the restricted argmax",
                             scores, prov, "Gould et al. 2023 effective-OV successor score")
    top = head_scores.top(config.top_k)
    top_heads = [{"head": str(h), "score": s,
                  "per_task": {n: float(per_task[i, h.layer, h.head]) for i, n in enumerate(names)}} for h, s in top]
    result = SuccessorResult(
        scores=head_scores, task_names=names, per_task=per_task, task_chance=task_chance, chance=chance,
        n_scored=count_by_task, top_heads=top_heads,
        successor_heads=[str(h) for h, _ in head_scores.above(config.threshold)], threshold=config.threshold,
        mapping=task_set.mapping(), dropped=task_set.dropped, provenance=prov)

    if config.run_probe:
        say(0.4, "index-mod-10 probe")
        result.probe = mod10_probe(task_set, embeddings, config.probe_l2)
    if config.run_arithmetic:
        say(0.5, "vector arithmetic through the top head")
        result.arithmetic_head = str(top[0][0])
        result.arithmetic = vector_arithmetic(circuit, task_set, embeddings, top[0][0], config)
    if config.run_causal:
        say(0.6, "causal check in context")
        result.causal = causal_check(model, task_set, [h for h, _ in top[: config.ablate_top_k]], config, say)
    say(1.0, "done")
    return result


# ---- figures ------------------------------------------------------------------------------------

def figures(result: SuccessorResult) -> dict[str, go.Figure]:
    """Heatmap of scores, per-task bars of the top heads, probe accuracy, arithmetic table, ablation."""
    figs: dict[str, go.Figure] = {}
    s = result.scores.scores
    figs["scores"] = go.Figure(go.Heatmap(z=s.tolist(), x=[f"H{h}" for h in range(s.shape[1])],
                                          y=[f"L{l}" for l in range(s.shape[0])], colorscale="Viridis",
                                          zmin=0, zmax=1, colorbar={"title": "score"}))
    figs["scores"].update_layout(title=f"Successor score per head (chance {result.chance:.3f}, "
                                       f"threshold {result.threshold})", xaxis_title="head", yaxis_title="layer")
    bars = go.Figure()
    for entry in result.top_heads[:5]:
        bars.add_bar(name=entry["head"], x=result.task_names, y=[entry["per_task"][n] for n in result.task_names])
    bars.add_scatter(name="chance", x=result.task_names, y=[result.task_chance[n] for n in result.task_names],
                     mode="markers", marker={"symbol": "line-ew-open", "size": 30, "color": "black"})
    bars.update_layout(title="Per-task successor score of the top heads", barmode="group", yaxis_range=[0, 1.05],
                       yaxis_title="score")
    figs["per_task"] = bars
    if result.probe:
        tasks = list(result.probe)
        probe = go.Figure()
        probe.add_bar(name="held-out accuracy", x=tasks, y=[result.probe[t]["accuracy"] for t in tasks])
        probe.add_bar(name="majority baseline", x=tasks, y=[result.probe[t]["majority"] for t in tasks])
        probe.add_hline(y=0.1, line_dash="dash", annotation_text="chance 0.1")
        probe.update_layout(title="Index mod 10 probe on effective embeddings (task held out)",
                            yaxis_range=[0, 1.05], barmode="group")
        figs["probe"] = probe
    if result.arithmetic:
        rows = result.arithmetic
        figs["arithmetic"] = go.Figure(go.Table(
            header={"values": ["task", "trials", "successes", "rate", "chance"]},
            cells={"values": [[r["task"] for r in rows], [r["trials"] for r in rows], [r["successes"] for r in rows],
                              [f"{r['rate']:.3f}" for r in rows], [f"{r['chance']:.3f}" for r in rows]]}))
        figs["arithmetic"].update_layout(title=f"Vector arithmetic through {result.arithmetic_head}")
    causal = result.causal
    if causal and "effect" in causal:
        ablation = go.Figure()
        ablation.add_box(y=causal["random_effects"], name="random heads", boxpoints="all", jitter=0.3)
        ablation.add_scatter(x=["top heads"], y=[causal["effect"]], mode="markers", name=", ".join(causal["heads"]),
                             marker={"size": 14, "color": "crimson"})
        ablation.update_layout(title="Drop in P(correct next item) under mean ablation", yaxis_title="mean ΔP")
        figs["ablation"] = ablation
    return figs


def summary(result: SuccessorResult) -> str:
    """A plain-text summary (for the CLI and reports)."""
    lines = [f"chance {result.chance:.3f}; successor heads (> {result.threshold}): "
             f"{', '.join(result.successor_heads) or 'none'}"]
    for entry in result.top_heads:
        tasks = " ".join(f"{n}={v:.2f}" for n, v in entry["per_task"].items())
        lines.append(f"  {entry['head']:8s} {entry['score']:.3f}  {tasks}")
    return "\n".join(lines)
