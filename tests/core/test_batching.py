"""Memory-aware batching (probe/batching.py): sizes from free memory within a cap, out-of-memory halves the
batch and keeps finished work, one row that does not fit is a clear ProbeError; adopted in factual's loops."""

from __future__ import annotations

import pytest
import torch

from analyses import factual
from analyses.data.capitals import Capital
from analyses.data.counterfactual import build_counterfactuals
from analyses.planted.factual import PLANTED_TABLE, planted_factual_model
from probe import batching
from probe.errors import ProbeError

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@pytest.fixture(scope="module")
def setup():
    model = planted_factual_model()
    pool = [Capital(country, city) for country, city in PLANTED_TABLE]
    prompts = build_counterfactuals(model.tokenizer, pool, 8, seed=3).prompts
    return model, prompts


def test_is_oom_knows_torch_and_allocator_errors_only():
    assert batching.is_oom(OOM("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert batching.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert not batching.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not batching.is_oom(ValueError("out of range"))


def test_batch_size_follows_free_memory_within_the_cap(setup):
    model, _ = setup
    row = batching.row_bytes(model, 20)
    assert row > 0 and batching.row_bytes(model, 40) > row  # longer rows cost more
    assert batching.choose(model, 20, cap=8, free=int(3 * row / batching.MEMORY_FRACTION)) == 3
    assert batching.choose(model, 20, cap=8, free=10**15) == 8          # the cap holds
    assert batching.choose(model, 20, cap=8, free=0) == 1               # never below one row
    assert batching.free_bytes("cpu") > 0                               # psutil's available memory
    with pytest.raises(ProbeError, match="at least 1"):
        batching.choose(model, 20, cap=0)


def test_injected_oom_halves_the_batch_and_equals_the_unbatched_result(setup, monkeypatch):
    model, prompts = setup
    alone = factual.first_token_logits(model, prompts, batch_size=1)
    real, sizes = model.logits, []

    def logits(ids, *args, **kwargs):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise OOM("CUDA out of memory (injected)")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "logits", logits)
    monkeypatch.setattr(batching, "free_bytes", lambda device: 10**15)  # the cap decides the first size
    pair, argmax = factual.first_token_logits(model, prompts, batch_size=8)
    assert max(sizes) > 2 and sizes[1] == (sizes[0] + 1) // 2   # it ran out, then tried the half
    assert sum(s for s in sizes if s <= 2) == len(prompts)          # every row ran once to the end
    torch.testing.assert_close(pair, alone[0], equal_nan=True, rtol=0, atol=1e-9)
    assert torch.equal(argmax, alone[1])


def test_oom_at_batch_size_one_is_a_clear_error(setup, monkeypatch):
    model, prompts = setup

    def logits(ids, *args, **kwargs):
        raise OOM("CUDA out of memory (injected)")

    monkeypatch.setattr(model, "logits", logits)
    with pytest.raises(batching.BatchMemoryError, match="one row does not fit.*batch size 1"):
        factual.first_token_logits(model, prompts[:3], batch_size=4)
    assert issubclass(batching.BatchMemoryError, ProbeError)


def test_map_batched_keeps_finished_chunks_and_halves_for_the_rest():
    calls: list[list[int]] = []
    failed = {"once": False}

    def fn(chunk):
        calls.append(list(chunk))
        if len(chunk) == 4 and chunk[0] == 4 and not failed["once"]:  # the second chunk runs out once
            failed["once"] = True
            raise OOM("injected")
        return [x * x for x in chunk]

    assert batching.map_batched(fn, list(range(10)), 4) == [x * x for x in range(10)]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [6, 7], [8, 9]]  # chunk 1 kept, size 2 after
    with pytest.raises(batching.BatchMemoryError, match="batch size 1"):
        batching.map_batched(lambda chunk: (_ for _ in ()).throw(OOM("injected")), [1, 2], 2)
    with pytest.raises(RuntimeError, match="not memory"):  # other errors pass through untouched
        batching.map_batched(lambda chunk: (_ for _ in ()).throw(RuntimeError("not memory")), [1], 1)


def test_ships_readouts_survive_an_injected_oom_with_the_same_scores(monkeypatch):
    from analyses import planted, safety
    from analyses.safety import readouts

    model = planted.safety_model()
    ids = model.encode(planted.SAFETY_HARMFUL_PROMPTS[0])
    clean = safety.ships_query(model, ids, "query", 0.0)
    real, sizes = readouts.run_from_layer, []

    def run_from_layer(model, resid, start, *args, **kwargs):
        sizes.append(resid.shape[0])
        if resid.shape[0] > 3:
            raise OOM("CUDA out of memory (injected)")
        return real(model, resid, start, *args, **kwargs)

    monkeypatch.setattr(readouts, "run_from_layer", run_from_layer)
    again = safety.ships_query(model, ids, "query", 0.0)
    assert max(sizes) > 3 and min(sizes) <= 3
    torch.testing.assert_close(again, clean, rtol=0, atol=1e-5)  # other batch shapes: float32 rounding only


def test_factual_batches_follow_the_free_memory(setup, monkeypatch):
    model, prompts = setup
    length = max(model.encode(p.text).shape[-1] for p in prompts)
    monkeypatch.setattr(batching, "free_bytes", lambda device: int(2 * batching.row_bytes(model, length)
                                                                    / batching.MEMORY_FRACTION))
    sizes = [len(indices) for indices, _ in factual.prompts._groups(prompts, model, 8)]
    assert max(sizes) == 2 and sum(sizes) == len(prompts)


def test_retrieval_masking_decode_survives_an_injected_oom_with_the_same_answers(monkeypatch):
    from analyses import retrieval
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    sample = retrieval_samples(model)[0]
    others = [h for h in model.all_heads() if h != RETRIEVAL_HEAD][:2]
    conditions = retrieval.masking_conditions(model, [RETRIEVAL_HEAD, *others], [1], ("uniform", "zero"), 2, 0)
    expected = retrieval.masked_answers(model, sample, conditions, 6, batch=8)
    real, sizes = retrieval.masking._copy_cache, []

    def copy_cache(cache, repeats):
        sizes.append(repeats)
        if repeats > 2:
            raise OOM("CUDA out of memory (injected)")
        return real(cache, repeats)

    monkeypatch.setattr(retrieval.masking, "_copy_cache", copy_cache)
    assert retrieval.masked_answers(model, sample, conditions, 6, batch=8) == expected
    assert sizes[:3] == [len(conditions), 4, 2]  # 8 -> 4 -> 2, and 2 for the rest of the list
    assert sum(s for s in sizes if s <= 2) == len(conditions) == len(expected)  # each condition decoded once
