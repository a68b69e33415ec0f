"""bench/bench_floors.py counts the work an analyzer does: layer passes by shape, backward passes, engine steps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_floors", ROOT / "bench" / "bench_floors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_floors"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_floors", None)


@pytest.fixture(scope="module")
def model():
    from probe.models import load_model

    return load_model("tiny-llama", device="cpu")


def test_forward_and_cached_decode_are_counted_by_shape(bench, model) -> None:
    work = bench.Work()
    ids = torch.randint(0, model.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    calls = []  # every forward of the HF model, independently of the counting
    handle = model.hf_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        with bench.counting(model, work):
            model.logits(ids)  # fused path
            with model.hooks([("blocks.0.attn.hook_pattern", lambda value, hook: value)]):
                model.logits(ids)  # the bridge (a pattern hook keeps it there)
            model.generate(ids[:1], max_new_tokens=3, stop_ids=[])
    finally:
        handle.remove()
    L = model.n_layers
    forward = work.merged("forward")
    assert forward[(2, 7, 7)] == 2 * L
    assert forward[(1, 7, 7)] == L  # the prompt's prefill
    decode = sorted(shape for shape in forward if shape[1] == 1)
    assert decode and [k for _, _, k in decode] == list(range(8, 8 + len(decode)))  # one query over cache + itself
    assert all(forward[shape] == L for shape in decode)
    assert sum(forward.values()) == L * len(calls)  # every HF-model forward, fused or bridged, runs L layers
    assert not work.merged("backward") and not work.merged("engine")
    with bench.counting(model, bench.Work()):
        pass
    assert all(not block._forward_pre_hooks for block in model.bridge.blocks)  # removed on exit


def test_backward_passes_counted_once_per_layer(bench, model) -> None:
    work = bench.Work()
    ids = torch.randint(0, model.d_vocab, (1, 5), generator=torch.Generator().manual_seed(1))
    gate = torch.ones((), requires_grad=True)
    with bench.counting(model, work), torch.enable_grad():
        with model.hooks([("blocks.0.hook_resid_pre", lambda value, hook: value * gate)]):
            logits = model.bridge(ids)
        logits.sum().backward()
    assert work.merged("backward") == {(1, 5, 5): model.n_layers}
    assert gate.grad is not None


def test_floor_sums_passes_times_per_layer_seconds(bench) -> None:
    class Plain:  # only what Floor reads before measuring
        config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 8})()

        def get_decoder(self):
            return None

    floor = bench.Floor(Plain(), repeats=1, decode_bucket=64)
    floor.forward_s = {(1, 4, 4): (0.5, 0.25), (1, 1, 65): (0.125, 0.0625)}
    floor.train_s = {(1, 4, 4): (1.5, 0.75)}
    work = bench.Work()
    for shape in [(1, 4, 4)] * 3 + [(1, 1, 10)] * 2:  # a decode step with 9 cached keys: the 64-key bucket
        work.add("forward", shape)
    work.add("backward", (1, 4, 4))
    work.add("engine", (1, 4, 4))
    seconds = floor.seconds(work)
    assert seconds["forward_floor_s"] == 3 * 0.5 + 2 * 0.125
    assert seconds["backward_floor_s"] == 1.5 - 0.5
    assert seconds["engine_floor_s"] == 0.5
    assert seconds["floor_cpu_s"] == 3 * 0.25 + 2 * 0.0625 + (0.75 - 0.25) + 0.25


def test_announced_stages_book_the_work_to_the_stage_under_way(bench) -> None:
    """Successor's messages announce the stage that starts: the passes before "causal check" are the scores'."""
    from collections import Counter

    work = bench.Work()
    work.stage = "pending"
    clock = bench.StageClock(work, bench.AnnouncedStages(bench.successor_stage))
    clock(0.0, "building succession tasks")
    work.add("forward", (1, 4, 4))  # MLP0 of the effective embeddings
    clock(0.6, "causal check in context")
    work.add("forward", (2, 5, 5))
    work.add("forward", (2, 5, 5))
    clock(1.0, "done")
    assert work.forward["scores, probe, arithmetic"] == Counter({(1, 4, 4): 1})
    assert work.forward["causal check"] == Counter({(2, 5, 5): 2})
    assert set(clock.seconds) == {"setup", "scores, probe, arithmetic", "causal check"}


def test_cdt_stages_split_the_engine_sweep_from_the_forwards_after_it(bench) -> None:
    """CD-T's engine rows belong to the sweep; the circuit search's and the evaluation's forwards to theirs."""
    from collections import Counter

    work = bench.Work()
    work.stage = "pending"
    clock = bench.StageClock(work, bench.STAGES["cdt"]())
    clock(0.0, "building the task")
    work.add("forward", (1, 9, 9))  # the clean cache
    work.add("engine", (4, 9, 9))
    clock(0.4, "CD-T sweep discovery: source layer 0")
    work.add("engine", (4, 9, 9))
    clock(0.8, "circuit search")
    work.add("forward", (2, 9, 9))
    clock(0.85, "faithfulness")
    work.add("forward", (3, 9, 9))
    work.add("forward", (3, 9, 9))
    clock(0.98, "accuracy")
    clock(1.0, "done")
    assert work.engine["task, sweep"] == Counter({(4, 9, 9): 2})
    assert work.forward["task, sweep"] == Counter({(1, 9, 9): 1})
    assert work.forward["circuit search"] == Counter({(2, 9, 9): 1})
    assert work.forward["evaluation"] == Counter({(3, 9, 9): 2})
    assert "path patching" not in work.forward
