"""The paper's two ablations and the ablated read-outs Ships and Sahara are computed from.

An ablated copy of a prompt is identical to the clean run below the ablated layer, so the fast path
caches the clean residual stream once and runs only the layers from the ablated one up, for many
ablated copies in one batch (each row has its own head(s), via `rows=`). The bridge's own
`start_at_layer` does not save this work in TransformerLens 4.3 (it still runs every block and
swaps the residual in at block k), so the partial forward is `probe.forward.run_from_layer`, which
runs the bridged decoder layers of any family; read-outs go through `probe.readout` (unembedding,
its bias and the final logit soft-cap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyses.safety.errors import SafetyError
from probe import batching
from probe.forward import run_from_layer
from probe.heads import Head, validate_heads
from probe.interventions import Intervention, intervene, scale
from probe.models import LoadedModel
from probe.parallel import map_items
from probe.readout import log_probs_from_normalized

ABLATIONS = {"query": "undifferentiated attention (query x eps, on the scores)",
             "output": "scaling contribution (head output z x eps)"}


def ablate(heads: Sequence[Head], ablation: str, epsilon: float, rows: Sequence[int] | None = None) -> Intervention:
    """The paper's UA (`query`) or SC (`output`) on `heads`, optionally on some batch rows only."""
    if ablation not in ABLATIONS:
        raise SafetyError(f"Unknown ablation {ablation!r}; choose query (UA) or output (SC).")
    where: dict[str, Any] = {} if rows is None else {"rows": tuple(rows)}
    return scale(heads, ablation, epsilon, **where)


@dataclass
class CleanRun:
    """What the clean pass of one prompt leaves for the ablated copies: residual stream and readouts."""

    ids: torch.Tensor
    resid_pre: list[torch.Tensor] | None  # [1, T, d_model] entering each layer (fast path only)
    final: torch.Tensor  # final-norm state at the last position [d_model]
    log_probs: torch.Tensor  # next-token log-probabilities at the last position [vocab], fp32


@torch.no_grad()
def clean_run(model: LoadedModel, ids: torch.Tensor, keep_residual: bool = True) -> CleanRun:
    names = {"ln_final.hook_out"}
    if keep_residual:
        names |= {f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)}
    cache: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def grab(value: torch.Tensor, hook: Any) -> None:
            cache[name] = value.detach()
        return grab

    with model.hooks([(name, keep(name)) for name in sorted(names)]):  # no attention hook: the fused path (SDPA)
        logits = model.logits(ids, positions="last")
    resid = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(model.n_layers)] if keep_residual else None
    return CleanRun(ids, resid, cache["ln_final.hook_out"][0, -1].float(),
                    torch.log_softmax(logits[0, -1].float(), dim=-1))


@dataclass
class ReadoutBatch:
    """One planned batch of `ablated_readouts`, a shard item of `probe.parallel.map_items`.

    Why: the caller plans the batches (row order, sizes from its own free memory) and each batch runs
    whole wherever it goes, so any contiguous split of them over Ray actors merges to the serial run's
    bits (a worker re-planning from its own free memory would cut other batches: other float rounding).
    """

    groups: list[list[Head]]
    ablation: str
    epsilon: float
    resid: dict[int, torch.Tensor] | None  # fast path: clean [1, T, d] entering each layer a row starts at
    ids: torch.Tensor  # [1, T] the prompt (the full forward when `resid` is None)
    want_log_probs: bool

    def __getstate__(self) -> dict[str, Any]:  # pickled only to cross processes: tensors travel on the CPU
        state = dict(self.__dict__)
        state["resid"] = None if self.resid is None else {k: v.cpu() for k, v in self.resid.items()}
        state["ids"] = self.ids.cpu()
        return state


@torch.no_grad()
def readout_batch(model: LoadedModel, batch: ReadoutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final states `[B, d]` (and log-probs `[B, vocab]`), fp32 on the CPU, of one planned batch; an
    out-of-memory error halves it (each half starts at its own lowest layer), finished rows kept."""
    n = len(batch.groups)
    finals = torch.empty((n, model.d_model), dtype=torch.float32)
    log_probs = torch.empty((n, model.d_vocab), dtype=torch.float32) if batch.want_log_probs else None
    resid = None if batch.resid is None else {k: v.to(model.device) for k, v in batch.resid.items()}

    def one(rows: list[int]) -> None:
        interventions = [ablate(batch.groups[g], batch.ablation, batch.epsilon, rows=[row])
                         for row, g in enumerate(rows)]
        with intervene(model, interventions):
            if resid is not None:
                start = min(min(h.layer for h in batch.groups[g]) for g in rows)
                final = run_from_layer(model, resid[start].expand(len(rows), -1, -1), start)[:, -1]
            else:
                ids = batch.ids.expand(len(rows), -1)
                _, cache = model.run_with_cache(ids, names_filter=lambda n: n == "ln_final.hook_out")
                final = cache["ln_final.hook_out"][:, -1]
        finals[rows] = final.float().cpu()
        if log_probs is not None:
            log_probs[rows] = log_probs_from_normalized(model, final).cpu()

    batching.split_on_oom(one, list(range(n)), what="Ships ablated read-outs")
    return finals, log_probs


@torch.no_grad()
def ablated_readouts(model: LoadedModel, clean: CleanRun, groups: Sequence[Sequence[Head]], ablation: str,
                     epsilon: float, batch_rows: int = 32, want_log_probs: bool = True,
                     fast: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final states `[G, d]` (and log-probs `[G, vocab]`) of one prompt with each head group ablated.

    Each group is one batch row with its own interventions; rows are sorted by the lowest ablated
    layer so a batch starts as late as it can from the cached clean residual stream. The batches are
    planned here and go through `probe.parallel.map_items` (a loop here; Ray actors for a sharded
    scan), merged in plan order: a sharded run equals the serial one bit for bit.
    """
    for group in groups:
        validate_heads(group, model)
        if not group:
            raise SafetyError("An ablation group must hold at least one head.")
    use_fast = fast and clean.resid_pre is not None
    order = sorted(range(len(groups)), key=lambda g: min(h.layer for h in groups[g]))
    size = batching.choose(model, clean.ids.shape[-1], batch_rows)  # what fits in free memory, <= batch_rows
    plan = [order[begin:begin + size] for begin in range(0, len(order), size)]
    items = []
    for rows in plan:
        starts = {min(h.layer for h in groups[g]) for g in rows}
        items.append(ReadoutBatch([list(groups[g]) for g in rows], ablation, epsilon,
                                  {k: clean.resid_pre[k] for k in sorted(starts)} if use_fast else None,  # type: ignore[index]
                                  clean.ids, want_log_probs))
    finals = torch.empty((len(groups), model.d_model), dtype=torch.float32)
    log_probs = torch.empty((len(groups), model.d_vocab), dtype=torch.float32) if want_log_probs else None
    for rows, (final, log_prob) in zip(plan, map_items(model, readout_batch, items)):
        finals[rows] = final
        if log_probs is not None:
            log_probs[rows] = log_prob
    return finals, log_probs
