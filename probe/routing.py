"""Fused path or bridge: the one route decision, and the entry points that follow it.

A forward that needs no attention pattern runs on the fused path (`probe.fused`: the model's own SDPA
attention, the open `intervene()` blocks handed over) wherever that is exact; anything else runs
through the bridge's hooks. `fused_reason(model)` is the decision (None: fused), asked by every entry
point here and by `LoadedModel.fused_reason`:

- `routed(model, fused_call, bridge_call)`: one call on either path, falling back to the bridge on a
  `FusedPathError` (a structural mismatch found on entry: everything is restored); `logits` (behind
  `LoadedModel.logits`) and `probe.routed_decode.generate` (behind `LoadedModel.generate`) are two;
- `on_fused_path(model)`: a block whose forwards run on the fused path where exact (partial forwards,
  batched generation, prefills);
- `forward_for_hooks(model)`: a whole forward run for what its hooks capture (no logits), with autograd
  where enabled;
- `bridge_only(model)`: a block in which every routed forward runs the bridge.

`PROBE_FUSED=0` sends every routed forward through the bridge (comparison, debugging); per model,
`model.fused_routing = False`. See docs/fused.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

import probe.fused as fused_path
from probe.errors import ProbeError
from probe.fused_checks import FusedPathError, unserved_reason
from probe.head_ops import Intervention
from probe.loaded import LoadedModel, Positions

FUSED_ENV = "PROBE_FUSED"
T = TypeVar("T")


def fused_reason(model: LoadedModel) -> str | None:
    """Why a routed forward of `model` would run the bridge now; None when it takes the fused path. The
    fused path is taken only where it is exact: no hook on a hook point it would skip (`hook_pattern`,
    `hook_attn_scores`, ...), every open `intervene()` block one it serves (head-output, streaming, and
    query scaling / uniform attention through the kernel's query), routing not switched off
    (`fused_routing`, `PROBE_FUSED=0`), the model not offloaded."""
    if not model.fused_routing:
        return "fused_routing is off on this model"
    if model.offloaded:
        return "weights offloaded to CPU/disk (device_map): the bridge's forward materialises them per module"
    if os.environ.get(FUSED_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"{FUSED_ENV}={os.environ[FUSED_ENV]}"
    with model.lock, model._handed_over():
        return unserved_reason(model, model._open_interventions())


def routed(model: LoadedModel, fused_call: Callable[[Sequence[Intervention]], T],
           bridge_call: Callable[[], T]) -> T:
    """`fused_call(open interventions)` with the open `intervene()` blocks handed over, where
    `fused_reason` says the fused path is exact, else (or on a `FusedPathError`) `bridge_call()`; holds
    `model.lock` for both."""
    with model.lock:
        if fused_reason(model) is None:
            try:
                with model._handed_over():
                    return fused_call(model._open_interventions())
            except FusedPathError:  # a structural mismatch found on entry: everything is restored
                pass
        return bridge_call()


def _pick_positions(logits: torch.Tensor, positions: Positions) -> torch.Tensor:
    """The bridge's full logits cut to `positions`, as `probe.fused.fused_logits` returns them."""
    if positions is None:
        return logits
    if isinstance(positions, str):
        if positions != "last":
            raise ProbeError(f"positions={positions!r}: use 'last', None (every position), a slice or indices.")
        return logits[:, -1:]
    if isinstance(positions, slice):
        chosen = logits[:, positions]
    else:
        chosen = logits[:, torch.as_tensor(list(positions), dtype=torch.long, device=logits.device)]
    if chosen.shape[1] == 0:
        raise ProbeError(f"positions={positions!r} selects no position of a {logits.shape[1]}-token input.")
    return chosen


def logits(model: LoadedModel, ids: torch.Tensor, positions: Positions = None) -> torch.Tensor:
    """`LoadedModel.logits`' route: `probe.fused.fused_logits` (only `positions` unembedded) where exact,
    else the bridge's forward cut to `positions`."""
    return routed(model, lambda interventions: fused_path.fused_logits(model, ids, interventions, positions=positions),
                  lambda: _pick_positions(model.bridge(ids), positions))


@contextlib.contextmanager
def on_fused_path(model: LoadedModel) -> Iterator[bool]:
    """For the block, the model's layers run on the fused path (`probe.fused`: the HF attention modules on
    SDPA, the open `intervene()` blocks handed over) where `fused_reason` says that is exact, as
    `LoadedModel.logits` routes a full forward; else nothing changes (the bridge's eager attention, hooks
    live). Yields which. Hold `model.lock`; `probe.forward.run_from_layer` records the layer arguments
    (`layer_calls`) inside the block, so the masks are in the fused kernel's format."""
    if fused_reason(model) is not None:
        yield False
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(model._handed_over())
            stack.enter_context(fused_path.fused(model, model._open_interventions()))
        except FusedPathError:  # a mismatch found on entry (everything restored): the bridge
            stack.close()
            yield False
            return
        yield True


@contextlib.contextmanager
def forward_for_hooks(model: LoadedModel) -> Iterator[Callable[[torch.Tensor], bool]]:
    """For the block, `run(ids)` is one whole forward whose point is what the attached hooks capture or
    change (no logits wanted), with autograd where it is enabled: on the fused path where
    `fused_reason` says that is exact (the open `intervene()` blocks handed over, no logit computed:
    unembedding hooks see an empty position axis), else through the bridge. `run` returns whether it ran
    fused. Why a block and not a call: a backward through layers recomputed in the backward
    (`model.recompute_layers_in_backward`) must find the same path in place, so call `backward()` inside it. Holds `model.lock`."""
    with model.lock, on_fused_path(model) as fused_ok:
        def run(ids: torch.Tensor) -> bool:
            if fused_ok:  # an empty `logits_to_keep`: the unembedding multiplies no row
                model.hf_model(ids, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
            else:
                model.bridge(ids, use_cache=False)
            return fused_ok

        yield run


@contextlib.contextmanager
def bridge_only(model: LoadedModel) -> Iterator[None]:
    """For the block, every routed forward of `model` runs the bridge (`fused_routing` off), held under
    the model's lock, so no other thread sees the switch."""
    with model.lock:
        old = model.fused_routing
        model.fused_routing = False
        try:
            yield
        finally:
            model.fused_routing = old
