"""Memory-aware batching: batch sizes from the device's free memory, halved on out-of-memory.

Two pieces, used by the analyzers' batched loops:

- `choose(model, tokens, cap)`: how many rows of `tokens` tokens fit in half the free memory of the
  model's device (CUDA: `torch.cuda.mem_get_info`; CPU: psutil's available memory), by a per-row
  estimate of one eager forward (`row_bytes`), never more than `cap` (the analyzer's configured
  batch size) nor fewer than 1. The estimate is deliberately rough; the second piece catches it.
- `split_on_oom(fn, indices, ids)`: run `fn` on a batch; when torch raises out-of-memory, free the
  cache and run the two halves instead (recursively). Work already done is kept: `fn` stores each
  finished row's result, and a half that ran is never re-run. A single row that does not fit is a
  `BatchMemoryError` (a `ProbeError`) naming the device, never a crash mid-analysis.
  `map_batched(fn, items, size)` is the same over a list: chunks of `size`, an OOM halves the size for
  the rest of the list, finished chunks are kept.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from probe.errors import ProbeError
from probe.loaded import LoadedModel

T = TypeVar("T")
R = TypeVar("R")
MEMORY_FRACTION = 0.5  # of the free memory one batch may plan to use (the rest: weights' temporaries, others)


class BatchMemoryError(ProbeError):
    """Even one row does not fit in the device's memory."""


def is_oom(error: BaseException) -> bool:
    """Whether `error` is torch running out of memory: `torch.OutOfMemoryError` (CUDA), or the
    RuntimeError the CPU and MPS allocators raise."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower()
                                                or "DefaultCPUAllocator: can't allocate memory" in text)


def free_bytes(device: str | torch.device) -> int | None:
    """Free memory of `device` in bytes: CUDA's own count, psutil's available RAM on CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    if device.type == "mps" and hasattr(torch, "mps"):
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    return None


def row_bytes(model: LoadedModel, tokens: int, grad: bool = False) -> int:
    """Estimated peak bytes one batch row of `tokens` tokens adds to a forward: the residual stream and
    MLP activations of a layer, the eager attention scores and pattern (heads x tokens^2, kept for the
    hooks), and the fp32 logits. With `grad`, every layer's activations stay alive for the backward."""
    element = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    per_layer = tokens * 16 * model.d_model + 3 * model.n_heads * tokens * tokens
    layers = model.n_layers if grad else 1
    return int(element * per_layer * layers + 4 * tokens * model.d_vocab)


def choose(model: LoadedModel, tokens: int, cap: int, grad: bool = False, free: int | None = None) -> int:
    """A batch size for rows of `tokens` tokens: what fits in `MEMORY_FRACTION` of the free memory of the
    model's device (`free` overrides the measurement), within [1, cap]."""
    if cap < 1:
        raise ProbeError(f"A batch size cap must be at least 1, not {cap}.")
    free = free_bytes(model.device) if free is None else free
    if free is None:
        return cap
    fits = int(free * MEMORY_FRACTION) // max(1, row_bytes(model, tokens, grad))
    return max(1, min(cap, fits))


def _release() -> None:
    """Give back what an out-of-memory attempt left allocated before the halves run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_on_oom(fn: Callable[..., Any], indices: Sequence[int], *tensors: torch.Tensor,
                 what: str = "a batch") -> int:
    """`fn(indices, *tensors)` (tensors' rows match `indices`); on out-of-memory, the two halves in
    turn (recursively), the finished ones kept. Returns the largest row count that ran in one call.
    `fn` must store its results itself (in place, by index), so nothing finished is recomputed."""
    try:
        fn(indices, *tensors)
        return len(indices)
    except Exception as error:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
        if not is_oom(error):
            raise
        device = tensors[0].device if tensors else "the device"
        if len(indices) <= 1:
            raise BatchMemoryError(f"{what}: one row does not fit in the free memory of {device} "
                                   "(halving stopped at batch size 1); use a smaller model, a shorter "
                                   "input, --dtype bfloat16, or --device-map to spread the model.") from error
    _release()
    half = (len(indices) + 1) // 2
    ran = 0
    for part in (slice(0, half), slice(half, None)):
        ran = max(ran, split_on_oom(fn, list(indices[part]), *(t[part] for t in tensors), what=what))
    return ran


def map_batched(fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T], size: int,
                what: str = "a batch") -> list[R]:
    """`fn` over `items` in chunks of `size` (`fn(chunk)` returns one result per item), in order. An
    out-of-memory error halves the size and retries that chunk (the smaller size holds for the rest);
    finished chunks are kept. At size 1 it is a `BatchMemoryError`."""
    if size < 1:
        raise ProbeError(f"A batch size must be at least 1, not {size}.")
    results: list[R] = []
    start = 0
    while start < len(items):
        chunk = items[start:start + size]
        try:
            out = list(fn(chunk))
        except Exception as error:  # noqa: BLE001 - only out-of-memory is handled
            if not is_oom(error):
                raise
            if size == 1:
                raise BatchMemoryError(f"{what}: one item does not fit in the device's free memory (halving "
                                       "stopped at batch size 1).") from error
            _release()
            size = max(1, size // 2)
            continue
        if len(out) != len(chunk):
            raise ProbeError(f"{what}: {len(out)} results for {len(chunk)} items.")
        results.extend(out)
        start += len(chunk)
    return results
