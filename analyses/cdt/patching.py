"""Path-patching circuit discovery (Wang et al. 2022 style), built on `probe.interventions`: the baseline.

Sender s → logits: one forward with s's z replaced by its reference mean and every other head
frozen at its clean z (MLPs recompute); score = metric(patched) − metric(clean).
Sender s → receivers R: (1) forward with s patched and every head frozen, capturing the z each
receiver *would* compute from its patched inputs (a capture hook runs before the freeze);
(2) clean forward with only the receivers' z replaced by the captured values; score = Δ metric.
The patch value is the same per-position reference mean that CD-T uses as μ and that the
faithfulness evaluation ablates with. Rows of one forward = senders; one prompt per forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analyses.cdt.circuits import ScoreFn, batch_means
from analyses.cdt.tasks import LogitDiffBatch
from probe.heads import Head
from probe.interventions import Intervention, capture_z, intervene, mean_ablation, resample_ablation


def _metric(logits: torch.Tensor, good: int, bad: int) -> torch.Tensor:
    return logits[:, -1, good] - logits[:, -1, bad]


def _freeze_all(model, clean: dict[Head, torch.Tensor], except_heads: set[Head]) -> list[Intervention]:
    """Resample every head (but `except_heads`) with its own clean z: frozen, whatever flows in."""
    heads = [h for h in model.all_heads() if h not in except_heads]
    return [resample_ablation(heads, {h: clean[h] for h in heads})] if heads else []


@torch.no_grad()
def path_patching_scores(model, batches: Sequence[LogitDiffBatch], receivers: list[Head] | None,
                         means: Sequence[dict[Head, torch.Tensor]], chunk: int = 512) -> torch.Tensor:
    """`[L, H]` mean Δ metric of patching each sender (upstream of the receivers) to the receivers."""
    L, H = model.n_layers, model.n_heads
    limit = L if receivers is None else max(r.layer for r in receivers)
    excluded = set(receivers or [])
    senders = [h for h in model.all_heads() if h.layer < limit and h not in excluded]
    scores = torch.full((L, H), float("nan"), dtype=torch.float64)
    totals = torch.zeros(len(senders), dtype=torch.float64)
    count = 0
    for batch, mu in zip(batches, means):
        for p in range(batch.n_prompts):
            ids = batch.ids[p: p + 1]
            good, bad = int(batch.good[p]), int(batch.bad[p])
            clean_z = {h: z[0] for h, z in capture_z(model, ids, model.all_heads()).items()}
            clean_metric = float(_metric(model.logits(ids), good, bad))
            for start in range(0, len(senders), chunk):
                group = senders[start: start + chunk]
                rows = ids.expand(len(group), -1)
                patches = [mean_ablation([s], mu, rows=(i,)) for i, s in enumerate(group)]
                if receivers is None:
                    with intervene(model, _freeze_all(model, clean_z, set()) + patches):
                        value = _metric(model.logits(rows), good, bad)
                else:
                    captured = _capture_receivers(model, rows, receivers,
                                                  _freeze_all(model, clean_z, set()) + patches)
                    second = [resample_ablation([r], {r: captured[r][i]}, rows=(i,))
                              for i in range(len(group)) for r in receivers]
                    with intervene(model, second):
                        value = _metric(model.logits(rows), good, bad)
                totals[start: start + len(group)] += (value.double() - clean_metric).cpu()
            count += 1
    for index, sender in enumerate(senders):
        scores[sender.layer, sender.head] = totals[index] / count
    return scores


def _capture_receivers(model, rows: torch.Tensor, receivers: list[Head],
                       interventions: list[Intervention]) -> dict[Head, torch.Tensor]:
    """Each receiver's z computed from its (patched) inputs, before the freeze overwrites it."""
    captured: dict[Head, torch.Tensor] = {}
    by_layer: dict[int, list[Head]] = {}
    for r in receivers:
        by_layer.setdefault(r.layer, []).append(r)

    def make(layer_heads: list[Head]) -> Callable:
        def hook(z: torch.Tensor, hook) -> None:
            for r in layer_heads:
                captured[r] = z[:, :, r.head].detach().clone()
        return hook

    capture_hooks = [(f"blocks.{layer}.attn.hook_z", make(heads)) for layer, heads in by_layer.items()]
    with model.bridge.hooks(fwd_hooks=capture_hooks):  # registered first, so it runs before the freeze
        with intervene(model, interventions):
            model.logits(rows)
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
