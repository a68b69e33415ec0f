"""Tasks for circuit discovery: batches of equal-length prompts with a logit-difference metric.

A `LogitDiffBatch` holds prompts of one template (so one token length: no padding, and position-wise
means make sense), the answer token `good` and foil token `bad` of each prompt, and the mean-source
prompts (same template, no answer information) whose mean activations μ define β = a − μ.
Metric: logit(good) − logit(bad) at the last position.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from analyses.cdt.arch import CDTError
from analyses.data import ioi


@dataclass
class LogitDiffBatch:
    name: str
    ids: torch.Tensor  # [P, T]
    good: torch.Tensor  # [P]
    bad: torch.Tensor  # [P]
    mean_source_ids: torch.Tensor  # [R, T]
    texts: list[str]

    @property
    def n_prompts(self) -> int:
        return int(self.ids.shape[0])


def _single_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise CDTError(f"{word!r} is not a single token for this tokenizer.")
    if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
        raise CDTError(f"{word!r} is not in this tokenizer's vocabulary (it encodes as {tokenizer.unk_token!r}).")
    return ids[0]


def _encode_representable(model, text: str) -> torch.Tensor:
    """The prompt's ids, refusing a prompt the tokenizer cannot represent.

    A prompt with unknown-token pieces is not the task any more: on a word tokenizer that lacks the
    words, every successor prompt became `<bos> <unk> <unk> <unk>`, so clean and ablated runs scored
    the same and faithfulness divided by zero.
    """
    ids = model.encode(text)[0]
    unk = model.tokenizer.unk_token_id
    text_ids = model.tokenizer(text, add_special_tokens=False).input_ids  # not the BOS (some reuse unk's id)
    if unk is not None and unk in text_ids:
        pieces = model.tokenizer.convert_ids_to_tokens(ids.tolist())
        raise CDTError(f"This tokenizer cannot represent the task prompt {text!r} (it encodes as "
                       f"{' '.join(pieces)}); use a model whose vocabulary covers the task's words.")
    return ids


def _stack_same_length(model, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Token ids of the texts with the most common length; returns ids and the kept indices."""
    encoded = [_encode_representable(model, text) for text in texts]
    lengths: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        lengths[len(ids)].append(index)
    keep = max(lengths.values(), key=len)
    return torch.stack([encoded[i] for i in keep]), keep


def ioi_batches(model, n_per_template: int, seed: int = 0, templates: tuple[int, ...] | None = None,
                n_mean_source: int = 20) -> list[LogitDiffBatch]:
    """IOI prompts grouped by template; mean sources = ABC prompts of the same template."""
    chosen = templates if templates is not None else tuple(range(len(ioi.TEMPLATES)))
    batches = []
    for template in chosen:
        prompts = ioi.ioi_prompts(model.tokenizer, n_per_template, seed=seed + 101 * template, templates=(template,))
        ids, keep = _stack_same_length(model, [p.text for p in prompts])
        prompts = [prompts[i] for i in keep]
        mean_sources = ioi.abc_prompts(model.tokenizer, n_mean_source, seed=seed + 7 + 101 * template,
                                       templates=(template,))
        mean_source_ids, _ = _stack_same_length(model, mean_sources)
        if mean_source_ids.shape[1] != ids.shape[1]:
            continue
        batches.append(LogitDiffBatch(
            name=f"ioi-t{template}", ids=ids,
            good=torch.tensor([_single_id(model.tokenizer, p.io) for p in prompts], device=ids.device),
            bad=torch.tensor([_single_id(model.tokenizer, p.s) for p in prompts], device=ids.device),
            mean_source_ids=mean_source_ids, texts=[p.text for p in prompts]))
    if not batches:
        raise CDTError("No IOI template gives prompts of one token length for this tokenizer.")
    return batches


# ---- a second task: next item of a known sequence (days, months, counting words) -------------------

SEQUENCES: dict[str, tuple[str, ...]] = {
    "days": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "months": ("January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December"),
    "numbers": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
}


def successor_batches(model, kinds: tuple[str, ...] = ("days", "months"), run: int = 3,
                      n_mean_source: int = 20, seed: int = 0) -> list[LogitDiffBatch]:
    """"Monday, Tuesday, Wednesday," → " Thursday"; foil = the last item shown (" Wednesday").

    Mean-source prompts list `run` items of the same kind in a shuffled order (no successor rule).
    """
    import random

    rng = random.Random(seed)
    batches = []
    for kind in kinds:
        items = SEQUENCES[kind]
        texts, good, bad = [], [], []
        for start in range(len(items)):
            shown = [items[(start + i) % len(items)] for i in range(run)]
            answer = items[(start + run) % len(items)]
            texts.append(", ".join(shown) + ",")
            good.append(" " + answer)
            bad.append(" " + shown[-1])
        try:
            good_ids = [_single_id(model.tokenizer, w) for w in good]
            bad_ids = [_single_id(model.tokenizer, w) for w in bad]
        except CDTError:
            continue
        ids, keep = _stack_same_length(model, texts)
        mean_sources = []
        for _ in range(n_mean_source):
            mean_sources.append(", ".join(rng.sample(items, run)) + ",")
        mean_source_ids, _ = _stack_same_length(model, mean_sources)
        if mean_source_ids.shape[1] != ids.shape[1]:
            continue
        batches.append(LogitDiffBatch(
            name=f"successor-{kind}", ids=ids, good=torch.tensor([good_ids[i] for i in keep], device=ids.device),
            bad=torch.tensor([bad_ids[i] for i in keep], device=ids.device), mean_source_ids=mean_source_ids,
            texts=[texts[i] for i in keep]))
    if not batches:
        raise CDTError("No successor sequence is single-token for this tokenizer.")
    return batches


# Prefixes for more successor prompts (templates × start items): one batch per (template, kind), so
# prompts of different templates never share a text (a discovery / evaluation split by template).
SUCCESSOR_TEMPLATES: tuple[str, ...] = ("{items},", "Count: {items},", "Numbers: {items},", "Sequence: {items},",
                                        "List: {items},", "Next: {items},", "Say: {items},", "Order: {items},")


def successor_template_batches(model, templates: tuple[int, ...], kinds: tuple[str, ...] = ("numbers",),
                               run: int = 4, n_mean_source: int = 20, seed: int = 0) -> list[LogitDiffBatch]:
    """The successor task under each prefix template of `SUCCESSOR_TEMPLATES` (template 0 is
    `successor_batches`' plain list): every start item of each kind, foil = the last item shown;
    mean-source prompts = the same template with `run` shuffled items."""
    import random

    rng = random.Random(seed)
    batches = []
    for template in templates:
        if not 0 <= template < len(SUCCESSOR_TEMPLATES):
            raise CDTError(f"Successor template {template} does not exist (0..{len(SUCCESSOR_TEMPLATES) - 1}).")
        form = SUCCESSOR_TEMPLATES[template]
        for kind in kinds:
            items = SEQUENCES[kind]
            texts, good, bad = [], [], []
            for start in range(len(items)):
                shown = [items[(start + i) % len(items)] for i in range(run)]
                texts.append(form.format(items=", ".join(shown)))
                good.append(" " + items[(start + run) % len(items)])
                bad.append(" " + shown[-1])
            try:
                good_ids = [_single_id(model.tokenizer, w) for w in good]
                bad_ids = [_single_id(model.tokenizer, w) for w in bad]
            except CDTError:
                continue
            ids, keep = _stack_same_length(model, texts)
            mean_sources = [form.format(items=", ".join(rng.sample(items, run))) for _ in range(n_mean_source)]
            mean_source_ids, _ = _stack_same_length(model, mean_sources)
            if mean_source_ids.shape[1] != ids.shape[1]:
                continue
            batches.append(LogitDiffBatch(
                name=f"successor-{kind}-t{template}", ids=ids,
                good=torch.tensor([good_ids[i] for i in keep], device=ids.device),
                bad=torch.tensor([bad_ids[i] for i in keep], device=ids.device), mean_source_ids=mean_source_ids,
                texts=[texts[i] for i in keep]))
    if not batches:
        raise CDTError("No successor template gives single-token items of one length for this tokenizer.")
    return batches


@torch.no_grad()
def accuracy(model, batches: list[LogitDiffBatch]) -> dict[str, float]:
    """Share of prompts whose top-1 next token is the answer, and the mean logit difference."""
    correct = total = 0
    diffs = []
    for batch in batches:
        logits = model.logits(batch.ids, positions="last")[:, -1]
        correct += int((logits.argmax(-1) == batch.good).sum())
        total += batch.n_prompts
        rows = torch.arange(batch.n_prompts)
        diffs.append(logits[rows, batch.good] - logits[rows, batch.bad])
    return {"top1_accuracy": correct / total, "mean_logit_diff": float(torch.cat(diffs).mean()),
            "positive_diff_rate": float((torch.cat(diffs) > 0).float().mean()), "n_prompts": total}
