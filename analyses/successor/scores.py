"""The successor score, read from the weights alone: every head's effective OV circuit at once.

For every task token t (see `analyses.data.succession`):

    e(t)          = MLP0(norm_mlp0(W_E[t]))                     effective embedding (options below)
    logits_LH(t)  = norm_in_L(e(t)) @ W_V[L, kv(H)] @ W_O[L, H] @ norms_after @ W_U[:, task tokens]

and head (L, H) "increments" t when, among the tokens of t's own task variant, the logit of t's
successor is the largest (restricted argmax: a full-vocabulary argmax rewards copy heads). The
successor score is the share of incremented task tokens; a successor head scores above `threshold`.

Norm conventions (`norm_convention`, see docs/successor.md): the norm before MLP0 is always applied
exactly (MLP0 is non-linear). Downstream of MLP0, "weight" keeps the norms' diagonal weights and
LayerNorm centring but drops the per-token RMS/LN scale, which is a positive scalar per source token
and cannot change the restricted argmax; "module" applies the norm modules themselves to e(t) and to
the head's output (the slow reference does this); "none" uses no norm after MLP0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyses.data.succession import TaskSet, TokenTask
from analyses.successor.config import SuccessorConfig, UnsupportedArchitectureError
from probe import readout
from probe.architecture import Architecture, ArchitectureError, Norm, architecture
from probe.models import LoadedModel


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
    per-head W_V / W_O (packed projections already split), each norm's effective diagonal (Gemma's
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
        final_norm=functools.partial(readout.apply_final_norm, model),
        final_weight=readout.final_norm_weight(model).float(),
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
