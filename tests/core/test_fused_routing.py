"""`LoadedModel.logits` / `generate` route to the fused path (probe/fused.py) where it is exact.

On the families of tests/support/families.py that differ in how attention is laid out (GQA, Gemma 2's eager
soft-cap, fused QKV, a parallel block, GPT-2's Conv1D): routed clean and intervened forwards and cached
generation == the bridge's; what needs the pattern or the bridge's hook order stays on the bridge, bit for
bit; `run_with_cache`, `run_with_hooks` and the bridge's own forward are never routed; `PROBE_FUSED=0`,
`fused_routing = False` and `bridge_only` switch the routing off; a `FusedPathError` on entry falls back to
the bridge; the served check reads a cached module structure that follows the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fused_helpers import ATOL, FLOOR, RTOL, TEXT, _bridge_only
from fused_helpers import root  # a fixture: pytest finds it in this module
from matrix import loaded_family
from probe.fused import FusedPathError, unserved_reason
from probe.heads import Head
from probe.interventions import (
    head_means,
    intervene,
    mean_ablation,
    mean_source_prompts,
    scale,
    streaming_attention,
    uniform_attention,
    zero_ablation,
)


# ---- LoadedModel.logits / generate route here where it is exact ---------------------------------------

ROUTED = ("llama", "gemma2", "phi3", "gpt_neox", "gpt2")  # GQA, eager soft-cap, fused QKV, parallel, Conv1D


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the fused entry points `LoadedModel` calls (looked up on their modules at each call, so
    patching the modules works)."""
    import probe.fused as module
    import probe.routed_decode as decode_module

    calls = {"logits": 0, "generate": 0}
    real_logits, real_generate = module.fused_logits, decode_module.fused_generate

    def logits(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["logits"] += 1
        return real_logits(*args, **kwargs)

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(module, "fused_logits", logits)
    monkeypatch.setattr(decode_module, "fused_generate", generate)
    return calls


@pytest.mark.parametrize("name", ROUTED)
def test_model_logits_route_clean_and_intervened_forwards_to_the_fused_path(name, root, spy):
    """`model.logits` with and without the routing: clean logits ≤ 1e-4 abs, the effect of an `intervene()`
    block of head-output + streaming interventions (and a nested block) ≤ 1e-4 of the effect; `positions`."""
    model, _, _ = loaded_family(name, root)
    ids = model.encode(TEXT).repeat(2, 1)
    heads = [Head(1, h) for h in range(model.n_heads)]
    means = head_means(model, mean_source_prompts(model)[:2], heads[:2])
    outer = [zero_ablation([Head(0, 1), Head(2, 0)], start=4, rows=(1,)), mean_ablation(heads[:2], means),
             streaming_attention([Head(1, 3)], sink=1, recent=3)]
    inner = [scale([Head(2, 2)], "value", -2.0), scale([Head(0, 1)], "output", 3.0, stop=9)]
    with _bridge_only(model):
        clean_bridge = model.logits(ids).float()
        with intervene(model, outer):
            outer_bridge = model.logits(ids).float()
            with intervene(model, inner):
                both_bridge = model.logits(ids).float()
    assert spy["logits"] == 0
    clean = model.logits(ids).float()
    with intervene(model, outer):
        assert model.fused_reason() is None
        outer_fused = model.logits(ids).float()
        with intervene(model, inner):
            both_fused = model.logits(ids).float()
    assert spy["logits"] == 3 and model.intervening == []
    assert float((clean - clean_bridge).abs().max()) <= ATOL
    for fused_out, bridge_out in ((outer_fused, outer_bridge), (both_fused, both_bridge)):
        effect, ours = bridge_out - clean_bridge, fused_out - clean
        size = float(effect.abs().max())
        assert size > 1e-3
        assert float((ours - effect).abs().max()) / max(size, FLOOR) <= RTOL
    for positions, cut in (("last", clean_bridge[:, -1:]), (slice(2, 7), clean_bridge[:, 2:7]),
                           ([0, 4], clean_bridge[:, [0, 4]])):
        routed = model.logits(ids, positions=positions).float()
        with _bridge_only(model):
            bridged = model.logits(ids, positions=positions).float()
        assert routed.shape == bridged.shape == cut.shape
        assert torch.equal(bridged, cut) and float((routed - cut).abs().max()) <= ATOL


def test_model_generate_routes_decode_windows_to_the_fused_path(root, spy):
    """Greedy generation inside `intervene()` with windows that start in the decoded part: the fused path
    (positions from the cache length, not from the score hook) == the bridge's generation."""
    model, _, _ = loaded_family("llama", root)
    ids = model.encode("the capital of mary is the book of john and")
    n = ids.shape[-1]
    interventions = [zero_ablation(model.all_heads()[2:], start=n + 1), scale([Head(1, 2)], "value", -3.0),
                     streaming_attention([Head(2, 1)], sink=1, recent=2, start=n)]
    with intervene(model, interventions):
        with _bridge_only(model):
            expected = model.generate(ids, max_new_tokens=6)
        assert spy["generate"] == 0
        got = model.generate(ids, max_new_tokens=6)
    assert spy["generate"] == 1
    assert got.tolist() == expected.tolist()
    with intervene(model, [uniform_attention([Head(1, 0)], start=n), scale([Head(0, 2)], "query", 1e-5, start=n + 1)]):
        with _bridge_only(model):
            expected = model.generate(ids, max_new_tokens=6)
        got = model.generate(ids, max_new_tokens=6)
    assert spy["generate"] == 2 and got.tolist() == expected.tolist()


def test_what_needs_the_pattern_or_the_hook_order_stays_on_the_bridge(root, spy):
    """A hook on hook_pattern and a hook on hook_z attached before an ablation of that layer (the bridge runs
    it before the ablation) keep `model.logits` on the bridge, with the bridge's own numbers (bit for bit);
    query scaling, uniform attention and a residual-stream hook do not."""
    model, _, _ = loaded_family("llama", root)
    ids = model.encode(TEXT)
    fired: list[str] = []

    def pattern_hook(pattern: torch.Tensor, hook: Any) -> None:
        fired.append(hook.name)

    captured: dict[str, torch.Tensor] = {}

    def grab_z(z: torch.Tensor, hook: Any) -> None:
        captured["z"] = z[:, :, 1].clone()

    cases = [([], [("blocks.1.attn.hook_pattern", pattern_hook)]),
             ([zero_ablation([Head(1, 1)])], [("blocks.1.attn.hook_z", grab_z)])]
    for interventions, hooks in cases:
        with model.hooks(hooks), intervene(model, interventions):
            assert model.fused_reason() is not None
            routed = model.logits(ids)
            with _bridge_only(model):
                bridged = model.logits(ids)
        assert torch.equal(routed, bridged)
    assert spy["logits"] == 0
    assert fired == ["blocks.1.attn.hook_pattern"] * 2
    assert float(captured["z"].abs().max()) > 0  # captured before the ablation, as the bridge orders it

    def shift(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid * 1.5

    with model.hooks([("blocks.1.hook_resid_pre", shift)]), intervene(model, [zero_ablation([Head(2, 1)])]):
        routed = model.logits(ids).float()
        with _bridge_only(model):
            bridged = model.logits(ids).float()
    assert spy["logits"] == 1 and float((routed - bridged).abs().max()) <= ATOL
    for interventions in ([scale([Head(1, 1)], "query", 0.0)], [uniform_attention([Head(0, 2)]), zero_ablation([Head(1, 0)])]):
        with intervene(model, interventions):
            assert model.fused_reason() is None
            routed = model.logits(ids).float()
            with _bridge_only(model):
                bridged = model.logits(ids).float()
        assert float((routed - bridged).abs().max()) <= ATOL
    assert spy["logits"] == 3


def test_run_with_cache_run_with_hooks_and_the_bridge_stay_the_bridges(root, spy, monkeypatch):
    """Inside an `intervene()` block, a routed `model.logits` leaves the block's hooks live for what comes
    next: `run_with_cache`, `run_with_hooks` and the bridge's own forward still see the ablation (and see
    hook_pattern); `PROBE_FUSED=0` and `fused_routing = False` switch the routing off."""
    model, _, _ = loaded_family("llama", root)
    ids = model.encode(TEXT)
    head = Head(1, 2)
    with intervene(model, zero_ablation([head])):
        routed = model.logits(ids)
        assert spy["logits"] == 1 and not any(r.handed_over for r in model.intervening)
        logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in ("blocks.1.attn.hook_z",
                                                                                "blocks.1.attn.hook_pattern"))
        assert float(cache["blocks.1.attn.hook_z"][:, :, head.head].abs().max()) == 0.0
        assert "blocks.1.attn.hook_pattern" in cache
        seen: list[float] = []
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z",
                                              lambda z, hook: seen.append(float(z[:, :, head.head].abs().max())))])
        direct = model.bridge(ids)
    assert seen == [0.0] and spy["logits"] == 1
    assert float((routed - logits).abs().max()) <= ATOL and torch.equal(logits, direct)
    monkeypatch.setenv("PROBE_FUSED", "0")
    assert model.fused_reason() == "PROBE_FUSED=0"
    model.logits(ids)
    monkeypatch.delenv("PROBE_FUSED")
    with _bridge_only(model):
        assert model.fused_reason() == "fused_routing is off on this model"
        model.logits(ids)
    assert spy["logits"] == 1
    model.logits(ids)
    assert spy["logits"] == 2


def test_a_fused_path_error_on_entry_falls_back_to_the_bridge(root, monkeypatch):
    """A mismatch `fused()` finds only on entry (e.g. an output projection its HF attention does not call)
    is a `FusedPathError`; `model.logits` / `generate` then run the bridge, with the block's hooks live."""
    import probe.fused as module

    model, _, _ = loaded_family("llama", root)
    ids = model.encode(TEXT)
    with intervene(model, zero_ablation([Head(1, 1)])), _bridge_only(model):
        expected, expected_tokens = model.logits(ids), model.generate(ids, max_new_tokens=3)

    @contextlib.contextmanager
    def refuse(*args: Any, **kwargs: Any) -> Iterator[None]:
        raise FusedPathError("no")
        yield

    monkeypatch.setattr(module, "fused", refuse)
    with intervene(model, zero_ablation([Head(1, 1)])):
        assert model.fused_reason() is None
        assert torch.equal(model.logits(ids), expected)
        assert model.generate(ids, max_new_tokens=3).tolist() == expected_tokens.tolist()


def test_bridge_only_routes_every_forward_of_its_block_through_the_bridge(root, spy):
    """`probe.routing.bridge_only`: inside the block the route decision says bridge and no fused entry point
    runs; after it, routing is as it was."""
    from probe.routing import bridge_only

    model, _, _ = loaded_family("llama", root)
    ids = model.encode(TEXT)
    with bridge_only(model):
        assert model.fused_reason() == "fused_routing is off on this model"
        model.logits(ids)
        model.generate(ids, max_new_tokens=2)
    assert spy == {"logits": 0, "generate": 0}
    assert model.fused_routing and model.fused_reason() is None
    model.logits(ids)
    assert spy["logits"] == 1


def test_the_served_check_reads_a_cached_structure_that_follows_the_model(root, monkeypatch):
    """`unserved_reason` (asked before every routed forward) walks the module tree once per model, not per
    call; hooks attached or removed later, and attention slots swapped out (as retrieval's native prefill
    does), are still seen on the next call."""
    import probe.fused_checks as module

    model, _, _ = loaded_family("llama", root)
    assert unserved_reason(model) is None
    walks = []
    real = module._build_structure
    monkeypatch.setattr(module, "_build_structure", lambda *a: walks.append(1) or real(*a))
    for _ in range(3):
        assert model.fused_reason() is None
    assert walks == []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: None)]):
        assert "blocks.1.attn.hook_pattern" in (unserved_reason(model) or "")
    assert unserved_reason(model) is None and walks == []
    parent, name, bridge_attn, original = module._swap_slots(model)[1]
    parent._modules[name] = original
    try:
        assert "could not be matched" in (unserved_reason(model) or "")
    finally:
        parent._modules[name] = bridge_attn
    assert unserved_reason(model) is None and len(walks) == 1  # re-read while swapped; the cached one holds again
