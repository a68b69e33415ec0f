"""Path-patching circuit discovery (Wang et al. 2022 style), built on `probe.interventions`: the baseline.

Sender s → logits: one forward with s's z replaced by its mean over the mean-source prompts and every
other head frozen at its clean z (MLPs recompute); score = metric(patched) − metric(clean).
Sender s → receivers R: (1) forward with s patched and every head frozen, capturing the z each
receiver *would* compute from its patched inputs (a capture hook runs before the freeze);
(2) clean forward with only the receivers' z replaced by the captured values; score = Δ metric.
The patch value is the same per-position mean that CD-T uses as μ and that the
faithfulness evaluation ablates with. Rows of one forward = (sender, prompt) pairs of one template
(the core's per-row resample values freeze each row at its own prompt's clean z).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analyses.cdt.circuits import ScoreFn, batch_means
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.interventions import Intervention, capture_z, intervene, mean_ablation, resample_ablation


def _metric(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """logit(good) − logit(bad) at the last position, one answer pair per row."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[:, -1]
    return last[rows, good.to(last.device)] - last[rows, bad.to(last.device)]


@torch.no_grad()
def path_patching_scores(model, batches: Sequence[LogitDiffBatch], receivers: list[Head] | None,
                         means: Sequence[dict[Head, torch.Tensor]], chunk_rows: int = 256) -> torch.Tensor:
    """`[L, H]` mean Δ metric of patching each sender (upstream of the receivers) to the receivers.

    Batched: one forward holds (sender, prompt) rows, row = sender_index * P + prompt, for the P
    prompts of one template; each row freezes every head at *its prompt's* clean z (per-row
    resample values) and mean-ablates its own sender. At most `chunk_rows` rows per forward.
    """
    L, H = model.n_layers, model.n_heads
    limit = L if receivers is None else max(r.layer for r in receivers)
    excluded = set(receivers or [])
    senders = [h for h in model.all_heads() if h.layer < limit and h not in excluded]
    scores = torch.full((L, H), float("nan"), dtype=torch.float64)
    totals = torch.zeros(len(senders), dtype=torch.float64)
    count = 0
    heads = model.all_heads()
    for batch, mu in zip(batches, means):
        P = batch.n_prompts
        clean_z = capture_z(model, batch.ids, heads)  # {head: [P, T, d_head]}
        clean_metric = _metric(model.logits(batch.ids, positions="last"), batch.good, batch.bad).double().cpu()  # [P]
        per_forward = max(1, chunk_rows // P)
        for start in range(0, len(senders), per_forward):
            group = senders[start: start + per_forward]
            G = len(group)
            ids = batch.ids.repeat(G, 1)
            good, bad = batch.good.repeat(G), batch.bad.repeat(G)
            frozen = [resample_ablation(heads, {h: clean_z[h].repeat(G, 1, 1) for h in heads})]
            patches = [mean_ablation([s], mu, rows=tuple(range(i * P, (i + 1) * P))) for i, s in enumerate(group)]
            if receivers is None:
                with intervene(model, frozen + patches):
                    value = _metric(model.logits(ids, positions="last"), good, bad)
            else:
                captured = _capture_receivers(model, ids, receivers, frozen + patches)
                with intervene(model, resample_ablation(receivers, captured)):
                    value = _metric(model.logits(ids, positions="last"), good, bad)
            delta = value.double().cpu().reshape(G, P) - clean_metric[None]
            totals[start: start + G] += delta.sum(1)
        count += P
    for index, sender in enumerate(senders):
        scores[sender.layer, sender.head] = totals[index] / count
    return scores


class _ReceiversCaptured(Exception):
    """Raised by the last receiver layer's capture hook: nothing after it (later layers, the unembedding of
    every position) is needed, and this capture runs on the bridge (its hook precedes the freeze)."""


def _capture_receivers(model, rows: torch.Tensor, receivers: list[Head],
                       interventions: list[Intervention]) -> dict[Head, torch.Tensor]:
    """Each receiver's z computed from its (patched) inputs, before the freeze overwrites it; the forward
    stops at the last receiver layer."""
    captured: dict[Head, torch.Tensor] = {}
    by_layer: dict[int, list[Head]] = {}
    for r in receivers:
        by_layer.setdefault(r.layer, []).append(r)
    last = max(by_layer)

    def make(layer: int, layer_heads: list[Head]) -> Callable:
        def hook(z: torch.Tensor, hook) -> None:
            for r in layer_heads:
                captured[r] = z[:, :, r.head].detach().clone()
            if layer == last:
                raise _ReceiversCaptured
        return hook

    capture_hooks = [(f"blocks.{layer}.attn.hook_z", make(layer, heads)) for layer, heads in by_layer.items()]
    with model.hooks(capture_hooks):  # registered first, so it runs before the freeze
        with intervene(model, interventions):
            try:
                model.logits(rows)
            except _ReceiversCaptured:
                pass
    return captured


def path_patching_score_fn(model, batches: Sequence[LogitDiffBatch],
                           means: Sequence[dict[Head, torch.Tensor]] | None = None) -> ScoreFn:
    """A `ScoreFn` for `iterative_search`: one path-patching pass per iteration."""
    means = list(means) if means is not None else [batch_means(model, b) for b in batches]

    def score(targets: list[Head] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = path_patching_scores(model, batches, targets, means)
        key = "logits" if targets is None else "+".join(str(t) for t in targets)
        return values, {key: torch.nan_to_num(values)}

    return score
