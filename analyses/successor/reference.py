"""The slow reference: the paper's algorithm, one head and one token at a time, with e(t) read off
the model's own forward; the fast path of `analyses.successor.scores` is tested against it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analyses.data.succession import TaskSet, TokenTask
from analyses.successor.config import SuccessorConfig
from analyses.successor.scores import _arch, _norm_or_identity
from probe import readout
from probe.heads import Head
from probe.models import LoadedModel


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
        out = readout.apply_final_norm(model, out)                            # the family's own final norm
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
