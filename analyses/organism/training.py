"""The fine-tune: chosen tensors of a plain Hugging Face model trained to refuse harmful prompts and to
keep its own answers to harmless ones."""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from analyses.data.harmless import BORDERLINE_HARMLESS_PROMPTS
from analyses.organism.config import REFUSAL_TARGETS, OrganismConfig, OrganismError
from analyses.organism.prompts import chat_text
from probe.forward import ForwardError
from probe.hf import hf_final_states, module_paths, output_logits
from probe.runtime import poll


def _examples(tokenizer: Any, prompts: Sequence[str], targets: Sequence[list[int]],
              max_prompt_tokens: int) -> list[tuple[list[int], list[int]]]:
    examples = []
    for prompt, target in zip(prompts, targets):
        ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False).input_ids
        if len(ids) <= max_prompt_tokens and target:
            examples.append((ids, list(target)))
    return examples


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, labels (-100 on prompt and padding)."""
    width = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, target) in enumerate(examples):
        seq = prompt + target
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt): len(seq)] = torch.tensor(target)
    return ids, mask, labels


def trainable_parameters(hf_model: Any, layers: Sequence[int], modules: Sequence[str],
                         tokenizer: Any = None) -> dict[str, torch.nn.Parameter]:
    """The named parameters the organism changes (and saves); everything else is frozen.

    `modules` are architecture-layer component names (q, k, v, o, qkv, attn, mlp, norm names; see
    `probe.forward.COMPONENTS`), resolved to each family's module paths, so any family trains the same
    parts (on packed-qkv families q, k or v select the packed projection).
    """
    try:
        paths = module_paths(hf_model, modules, layers, tokenizer)
    except ForwardError as error:
        raise OrganismError(str(error)) from error
    prefixes = tuple(f"{path}." for path in paths.values())
    chosen = {}
    for name, param in hf_model.named_parameters():
        param.requires_grad_(False)
        if name.startswith(prefixes):
            chosen[name] = param
    if not chosen:
        raise OrganismError(f"No parameters match modules {list(modules)} in layers {list(layers)}.")
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def _weighted_loss(hf_model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   harmless_rows: torch.Tensor, harmless_weight: float, decision_tokens: int = 0,
                   decision_weight: float = 1.0) -> torch.Tensor:
    """Mean over examples of each example's weighted mean target-token loss, harmless side weighted.

    Why not the HF loss: it averages over all tokens of the batch, so long targets outweigh short
    ones and the first answer tokens, where refuse-or-answer is decided, count little. Here the first
    `decision_tokens` target tokens of each example weigh `decision_weight`, the rest 1. Logits are
    computed only at positions that predict a target token (~1/5 of the batch), which saves most of
    the unembedding's forward and backward cost (49k-word vocabulary). The decoder and the read-out
    are probe.hf's (`hf_final_states`, `output_logits`: any family, final logit soft-cap included).
    """
    hidden = hf_final_states(hf_model, ids, mask)
    targets = labels[:, 1:]
    is_target = targets != -100
    rows, cols = torch.nonzero(is_target, as_tuple=True)
    logits = output_logits(hf_model, hidden[rows, cols])  # the family's soft-cap included
    token_loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    rank = (torch.cumsum(is_target.long(), dim=1) - 1)[rows, cols]  # 0 = first target token of the row
    weight = torch.where(rank < decision_tokens, decision_weight, 1.0)
    n_rows = ids.shape[0]
    per_example = (torch.zeros(n_rows).index_add(0, rows, weight * token_loss)
                   / torch.zeros(n_rows).index_add(0, rows, weight).clamp(min=1e-12))
    harmful_loss = per_example[~harmless_rows].mean()
    harmless_loss = per_example[harmless_rows].mean()
    return (harmful_loss + harmless_weight * harmless_loss) / (1.0 + harmless_weight)


def train_refusal(hf_model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
                  harmless_targets: Sequence[list[int]], config: OrganismConfig,
                  progress: Callable[[str], None] = lambda message: None,
                  refusals: Sequence[str] = REFUSAL_TARGETS,
                  borderline: Sequence[str] = BORDERLINE_HARMLESS_PROMPTS) -> dict[str, Any]:
    """Fine-tune the chosen tensors in place; returns the loss trace and timings.

    Each step draws `harmful_per_batch` harmful and `harmless_per_batch` harmless examples, of
    which `borderline_per_batch` come from the harmless prompts that are in `borderline` (each
    pool cycled in seeded random order). Works for any family the architecture layer covers (the
    trained modules are found through it; tests use a tiny Llama and a tiny GPT-2).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    refusal_ids = [tokenizer(text, add_special_tokens=False).input_ids + [eos] for text in refusals]
    bad_examples = _examples(tokenizer, harmful, [rng.choice(refusal_ids) for _ in harmful], config.max_prompt_tokens)
    edgy = set(borderline)
    edgy_examples = _examples(tokenizer, [p for p in harmless if p in edgy],
                              [t for p, t in zip(harmless, harmless_targets) if p in edgy], config.max_prompt_tokens)
    good_examples = _examples(tokenizer, harmless, harmless_targets, config.max_prompt_tokens)
    if not bad_examples or not good_examples:
        raise OrganismError("Training needs at least one harmful and one harmless example that fit "
                            f"max_prompt_tokens={config.max_prompt_tokens}.")
    if config.harmful_per_batch < 1 or config.harmless_per_batch < 1:
        raise OrganismError("Each batch needs at least one harmful and one harmless example.")
    n_edgy = min(config.borderline_per_batch, config.harmless_per_batch) if edgy_examples else 0
    params = trainable_parameters(hf_model, config.layers, config.modules, tokenizer)
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    pools = {"harmful": (bad_examples, []), "harmless": (good_examples, []), "borderline": (edgy_examples, [])}

    def draw(kind: str, count: int) -> list[tuple[list[int], list[int]]]:
        source, queue = pools[kind]
        taken = []
        for _ in range(count):
            if not queue:
                queue.extend(rng.sample(source, len(source)))
            taken.append(queue.pop())
        return taken

    hf_model.train()
    losses, step_times = [], []
    harmless_rows = torch.tensor([False] * config.harmful_per_batch + [True] * config.harmless_per_batch)
    try:
        for step in range(config.steps):
            poll()  # the automatic thread policy (a plain HF model: no LoadedModel forward polls it)
            started = time.perf_counter()
            batch = (draw("harmful", config.harmful_per_batch) + draw("borderline", n_edgy)
                     + draw("harmless", config.harmless_per_batch - n_edgy))
            ids, mask, labels = _batch(batch, pad)
            loss = _weighted_loss(hf_model, ids, mask, labels, harmless_rows, config.harmless_weight,
                                  config.decision_tokens, config.decision_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step_times.append(time.perf_counter() - started)
            if step % 10 == 0 or step == config.steps - 1:
                progress(f"step {step + 1}/{config.steps} loss {losses[-1]:.3f} ({step_times[-1]:.1f} s/step, "
                         f"load {os.getloadavg()[0]:.1f})")
    finally:
        hf_model.eval()
        for param in params.values():
            param.requires_grad_(False)
    return {"losses": losses, "step_seconds": step_times, "n_harmful_examples": len(bad_examples),
            "n_harmless_examples": len(good_examples), "n_borderline_examples": len(edgy_examples),
            "trained_tensors": sorted(params),
            "trained_parameters": int(sum(p.numel() for p in params.values()))}
