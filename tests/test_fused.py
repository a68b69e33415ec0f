"""The fused-attention path (probe/fused.py) == the bridge path, on every family of tests/families.py.

Per family (loaded the user's way, `load_model("hf:<folder>")`, once per process through tests/matrix.py):

- clean logits == the bridge's (every position, and the `positions` the caller asks for);
- for every head-output intervention the path serves (zero / mean / resample ablation, value and output
  scaling), one query head at a time (GQA: heads that share a key/value head separately), the effect
  (intervened - clean logits) == the bridge path's, relative to the effect's size;
- DuoAttention's streaming mask (a per-head mask for SDPA) == the bridge's masked eager scores, the model's
  own sliding windows (Gemma 2/3, prompts longer than the window) and a left-padded batch likewise;
- cached greedy generation with decode-only position windows == the bridge's `generate`;
- uniform attention (a zero query) and query scaling (a scaled query) on the kernel's query == the bridge's
  rewritten scores, per query head, also soft-capped (Gemma 2's eager kernel);
- what the path cannot serve (hooks on hook_pattern / hook_attn_scores) is a `FusedPathError`, and no hook,
  swapped module or kernel override is left on the model afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from families import FAMILIES, GQA
from matrix import loaded_family, record
from probe.errors import InterventionError, ProbeError
from probe.fused import FusedPathError, fused, fused_logits, implementation, unserved_reason
from probe.heads import Head
from probe.interventions import (
    capture_z,
    head_means,
    intervene,
    mean_ablation,
    reference_prompts,
    resample_ablation,
    scale,
    streaming_attention,
    uniform_attention,
    zero_ablation,
)
from probe.routed_decode import fused_generate

ALL = list(FAMILIES)
TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
SOURCE = "alice gave the book to bob and then went to the park on monday with mary and john " * 3
ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12")
ATOL, RTOL = 1e-4, 1e-4
FLOOR = 1e-2  # relative deviations are taken against max(effect, FLOOR)
LAYER = 1
KINDS = ("zero", "mean", "resample", "value", "output", "query", "uniform")
WORST: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fused_families")


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    started = (os.getloadavg(), time.time())
    yield
    kinds = [k for k in ("logits", *KINDS, "stream", "pad", "decode") if any(c == k for _, c in WORST)]
    lines = ["family      " + " ".join(f"{k:>9s}" for k in kinds)]
    for family in ALL:
        cells = [WORST.get((family, k)) for k in kinds]
        lines.append(f"{family:11s} " + " ".join(f"{'-' if v is None else f'{v:.1e}':>9s}" for v in cells))
    print("\nfused vs bridge, largest deviation (logits/stream/pad/decode: abs; kinds: relative to max(effect, 1e-2))\n"
          + "\n".join(lines))
    out = os.environ.get("PROBE_FUSED_TABLE_OUT")
    if out and WORST:  # docs/fused.md's agreement table is tied to this file (tests/test_doc_numbers.py)
        _write_table(Path(out), kinds, started, request.session.testsfailed)


def _write_table(out: Path, kinds: list[str], started: tuple[tuple[float, ...], float], failed: int) -> None:
    """WORST as a committed result file: the doc's table must show the numbers a run measured, not retyped ones."""
    import datetime
    import platform
    import sys

    families = [f for f in ALL if any(fam == f for fam, _ in WORST)]
    document = {
        "what": "fused path vs the bridge, largest deviation per family and check (tests/test_fused.py's WORST): "
                "logits / stream / pad / decode absolute; intervention kinds relative to max(effect, floor), "
                "each query head of layer 1 on its own batch row",
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PROBE_FUSED_TABLE_OUT=" + str(out)
                   + " python -m pytest -q -p no:cacheprovider tests/test_fused.py -s",
        "argv": sys.argv,
        "bounds": {"atol": ATOL, "rtol": RTOL, "effect_floor": FLOOR, "layer": LAYER,
                   "moves_the_logits": {"query": 1e-5, "uniform": 1e-5, "other kinds": 1e-4},
                   "query_scale": 0.3},
        "families": families,
        "kinds": kinds,
        "cells": {f: {k: WORST[(f, k)] for k in kinds if (f, k) in WORST} for f in families},
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_before": [round(x, 2) for x in started[0]],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started[1], 1),
        "tests_failed": failed,  # of the session when the module finished: 0 = every check above passed
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")


def _keep(family: str, check: str, value: float) -> float:
    WORST[(family, check)] = max(WORST.get((family, check), 0.0), float(value))
    return float(value)


@pytest.fixture(params=ALL)
def family(request: pytest.FixtureRequest, root: Path) -> tuple[str, Any]:
    model, _, _ = loaded_family(request.param, root)
    return request.param, model


def _hook_count(model: Any) -> int:
    modules = {id(m): m for tree in (model.hf_model, model.bridge) for m in tree.modules()}
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules.values())


def _state(model: Any) -> tuple[Any, ...]:
    """Hooks, attention slots and attention implementation: all must be as before after a fused call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    slots = tuple(id(child) for m in model.hf_model.modules() for child in m._modules.values() if child is not None)
    kernels = tuple(sorted((k, id(v)) for k, v in ALL_ATTENTION_FUNCTIONS._local_mapping.items()))
    return _hook_count(model), slots, model.hf_model.config._attn_implementation, kernels


@contextlib.contextmanager
def _bridge_only(model: Any) -> Iterator[None]:
    """`model.logits` / `generate` on the bridge (they route to the fused path where it is exact)."""
    before, model.fused_routing = model.fused_routing, False
    try:
        yield
    finally:
        model.fused_routing = before


def _bridge(model: Any, ids: torch.Tensor, interventions: list[Any]) -> torch.Tensor:
    with torch.no_grad(), intervene(model, interventions), _bridge_only(model):
        return model.logits(ids).float()


def _per_row(model: Any, kind: str, ids: torch.Tensor) -> list[Any]:
    """One intervention of `kind` per query head of LAYER, head h on batch row h (GQA: every head of a
    key/value group on its own)."""
    heads = [Head(LAYER, h) for h in range(model.n_heads)]
    if kind == "mean":
        means = head_means(model, reference_prompts(model)[:2], heads)
        return [mean_ablation([h], means, rows=(h.head,)) for h in heads]
    if kind == "resample":
        source = model.encode(SOURCE)[:, : ids.shape[-1]]
        assert source.shape[-1] == ids.shape[-1]
        z = capture_z(model, source, heads)
        return [resample_ablation([h], {h: z[h][0]}, rows=(h.head,)) for h in heads]
    if kind == "zero":
        return [zero_ablation([h], rows=(h.head,)) for h in heads]
    if kind == "uniform":
        return [uniform_attention([h], rows=(h.head,)) for h in heads]
    return [scale([h], kind, {"value": 2.5, "output": -1.5, "query": 0.3}[kind], rows=(h.head,)) for h in heads]


# ---- clean forwards -------------------------------------------------------------------------------

def test_clean_logits_equal_the_bridge(family):
    name, model = family
    ids = model.encode(TEXT)
    bridge = _bridge(model, ids, [])
    before = _state(model)  # after a bridge forward: its first forward adds its own norm pre-hooks
    fast = fused_logits(model, ids).float()
    assert fast.shape == bridge.shape
    worst = float((fast - bridge).abs().max())
    last = fused_logits(model, ids, positions="last").float()
    some = fused_logits(model, ids, positions=slice(3, 9)).float()
    picked = fused_logits(model, ids, positions=[0, 5, ids.shape[-1] - 1]).float()
    assert last.shape[1] == 1 and some.shape[1] == 6 and picked.shape[1] == 3
    worst = max(worst, float((last[:, 0] - bridge[:, -1]).abs().max()), float((some - bridge[:, 3:9]).abs().max()),
                float((picked - bridge[:, [0, 5, ids.shape[-1] - 1]]).abs().max()))
    assert _state(model) == before
    assert record(name, "fused logits", _keep(name, "logits", worst)) <= ATOL


def test_final_states_read_out_equal_the_bridges_logits_and_skip_the_unembedding(family):
    """`probe.forward.final_normalized` under an intervention, read out by `probe.readout.logits_from_normalized`,
    equals the bridge's logits at the last position; on the fused path the unembedding multiplies no row (the
    point of it: successor's causal check reads every condition out in one product), on the bridge it runs."""
    from probe import readout
    from probe.forward import final_normalized

    name, model = family
    ids = model.encode(TEXT)
    interventions = [scale([Head(LAYER, 0)], "output", -1.5)]
    bridge = _bridge(model, ids, interventions)[:, -1]
    rows: list[int] = []
    handle = model.bridge.unembed.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[1])))
    try:
        with torch.no_grad(), intervene(model, interventions):
            fused_states = final_normalized(model, ids)
            with _bridge_only(model):
                bridge_states = final_normalized(model, ids)
    finally:
        handle.remove()
    assert fused_states.shape == (1, 1, model.d_model) and rows == [0, ids.shape[-1]]
    worst = max(float((readout.logits_from_normalized(model, states[:, -1]) - bridge).abs().max())
                for states in (fused_states, bridge_states))
    assert worst <= ATOL, (name, worst)


def test_the_fused_path_runs_the_sdpa_kernel_and_no_bridge_attention(family, monkeypatch):
    """One SDPA call per layer (eager only where a layer soft-caps its scores: Gemma 2), and no hook point
    of the bridge's attention component (hook_attn_scores, hook_pattern, ...) fires."""
    name, model = family
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    fired: list[str] = []
    points = {n: p for n, p in model.bridge.hook_dict.items() if ".attn.hook_" in n and "hook_z" not in n}
    assert any("hook_pattern" in n for n in points)
    with fused(model):  # hooks it would not fire raise on entry: these are attached after the check
        handles = [p.register_forward_hook(lambda m, i, o, n=n: fired.append(n)) for n, p in points.items()]
        try:
            model.hf_model(model.encode(TEXT))
        finally:
            for handle in handles:
                handle.remove()
    assert not [n for n in fired if "hook_pattern" in n or "hook_attn_scores" in n or "hook_rot" in n]
    expected = "eager" if name == "gemma2" else "sdpa"
    assert implementation(model) == expected
    assert len(calls) == (model.n_layers if expected == "sdpa" else 0)


# ---- interventions --------------------------------------------------------------------------------

def test_intervention_effects_equal_the_bridge_per_query_head(family):
    """Every served kind, each query head of a layer on its own batch row: (intervened - clean) on the
    fused path == the bridge's, relative to the effect's largest entry, per head."""
    name, model = family
    ids = model.encode(TEXT).repeat(model.n_heads, 1)
    clean_bridge, clean_fused = _bridge(model, ids, []), fused_logits(model, ids).float()
    for kind in KINDS:
        interventions = _per_row(model, kind, ids)
        effect = _bridge(model, ids, interventions) - clean_bridge
        ours = fused_logits(model, ids, interventions).float() - clean_fused
        size = effect.flatten(1).abs().max(-1).values
        # GPT-2's random heads attend almost uniformly already: query scaling moves them by ~1e-5
        assert float(size.min()) > (1e-5 if kind in ("query", "uniform") else 1e-4), f"{kind}: a head does not move the logits"
        # relative to the effect, with a floor where float32 cannot resolve 1e-4 of it (GPT-2's tiny random
        # heads: mean / resample effects of ~2e-4 next to ~1.5e-7 kernel rounding): there the bound is 1e-6 abs
        worst = float(((ours - effect).flatten(1).abs().max(-1).values / size.clamp(min=FLOOR)).max())
        assert record(name, "fused Δ rel", _keep(name, kind, worst)) <= RTOL, kind


def test_gqa_value_scaling_scales_only_that_query_heads_z(family):
    """A value scale on one query head leaves the other query heads of its key/value group alone: the z
    the output projection's weights receive (a forward hook on the HF linear under the o-proj path) is
    the clean z with only that head's slice doubled, and equals the bridge's."""
    from probe.architecture import architecture, hf_module

    name, model = family
    ids = model.encode(TEXT)
    target = 3
    sibling = model.query_heads_of(model.kv_head_of(target))[0]
    assert (sibling != target) == (name in GQA)
    path = architecture(model).attention(LAYER).o_path
    seen: list[torch.Tensor] = []

    def grab(module: Any, args: tuple[torch.Tensor, ...], output: Any) -> None:
        seen.append(args[0].detach().reshape(*args[0].shape[:-1], model.n_heads, model.d_head).clone())

    intervention = scale([Head(LAYER, target)], "value", 2.0)
    with model.lock:
        handle = hf_module(model.hf_model.get_submodule(path)).register_forward_hook(grab)
        try:
            fused_logits(model, ids, positions="last")
            fused_logits(model, ids, [intervention], positions="last")
            _bridge(model, ids, [intervention])
        finally:
            handle.remove()
    clean, ours, bridge = seen
    torch.testing.assert_close(ours[:, :, target], 2 * clean[:, :, target], atol=1e-5, rtol=1e-4)
    others = [h for h in range(model.n_heads) if h != target]
    torch.testing.assert_close(ours[:, :, others], clean[:, :, others], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, bridge, atol=1e-5, rtol=1e-4)


def test_position_windows_rows_and_several_layers(family):
    """start/stop, batch rows and interventions on several layers at once, as the bridge applies them."""
    name, model = family
    ids = model.encode(TEXT).repeat(2, 1)
    interventions = [zero_ablation([Head(0, 1), Head(2, 0)], start=5, rows=(1,)),
                     scale([Head(1, 2)], "output", 3.0, start=2, stop=9)]
    effect = _bridge(model, ids, interventions) - _bridge(model, ids, [])
    ours = fused_logits(model, ids, interventions).float() - fused_logits(model, ids).float()
    assert float(effect[0].abs().max()) > 1e-3 and float(effect[1].abs().max()) > 1e-3
    assert record(name, "fused Δ rel", float((ours - effect).abs().max()) / float(effect.abs().max())) <= RTOL


# ---- masks ------------------------------------------------------------------------------------------

def test_streaming_mask_equals_the_bridges_masked_eager_attention(family):
    """DuoAttention's sink + recent window on two heads (a per-head mask for SDPA; additive for eager) ==
    the bridge's scores masked on hook_attn_scores; the sliding windows of Gemma's layers come along."""
    name, model = family
    ids = model.encode(TEXT)
    assert ids.shape[-1] > 12
    interventions = [streaming_attention([Head(0, 1), Head(2, 3)], sink=2, recent=3),
                     streaming_attention([Head(1, 0)], sink=0, recent=4, start=7, rows=(0,))]
    bridge, ours = _bridge(model, ids, interventions), fused_logits(model, ids, interventions).float()
    moved = float((bridge - _bridge(model, ids, [])).abs().max())
    assert moved > 1e-3
    assert record(name, "fused mask", _keep(name, "stream", float((ours - bridge).abs().max()))) <= ATOL


def test_left_padded_batch_equals_the_bridges_masked_forward(family):
    name, model = family
    rows = [model.encode(t)[0] for t in ROWS]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    interventions = [zero_ablation([Head(1, 1)]), streaming_attention([Head(2, 0)], sink=1, recent=2)]
    worst = 0.0
    for chosen in ([], interventions):
        with torch.no_grad(), intervene(model, chosen):
            bridge = model.bridge(ids, attention_mask=mask)[:, -1].float()
        ours = fused_logits(model, ids, chosen, positions="last", attention_mask=mask)[:, 0].float()
        worst = max(worst, float((ours - bridge).abs().max()))
    assert record(name, "fused mask", _keep(name, "pad", worst)) <= ATOL


# ---- cached generation ----------------------------------------------------------------------------

def test_cached_decoding_takes_positions_from_the_cache(family):
    """Position windows during cached decoding come from the cache length (the score hook that gives the
    bridge its offset does not fire here): a prefill and one-token steps through a `DynamicCache` give the
    logits of one no-cache forward over the whole sequence, with windows that start inside the decoded part."""
    from transformers import DynamicCache

    name, model = family
    ids = model.encode(SOURCE)[:, :24]
    n = 16
    interventions = [zero_ablation(model.all_heads()[2:], start=n + 2), scale([Head(1, 2)], "value", -3.0, start=n),
                     streaming_attention([Head(2, 1), Head(0, 3)], sink=1, recent=2, start=n + 1)]
    whole = fused_logits(model, ids, interventions, positions=slice(n - 1, None)).float()
    steps = []
    with torch.no_grad(), fused(model, interventions):
        cache = DynamicCache()
        steps.append(model.hf_model(ids[:, :n], past_key_values=cache, use_cache=True, logits_to_keep=1).logits)
        for t in range(n, ids.shape[-1]):
            steps.append(model.hf_model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    cached = torch.cat(steps, dim=1).float()
    moved = float((whole - fused_logits(model, ids, positions=slice(n - 1, None)).float())[:, 3:].abs().max())
    assert moved > 1e-3
    assert record(name, "fused mask", _keep(name, "decode", float((cached - whole).abs().max()))) <= ATOL


def test_cached_generation_equals_the_bridges(family):
    """Greedy cached generation with decode-only windows == the bridge's `generate` with the same interventions."""
    name, model = family
    ids = model.encode("the capital of mary is the book of john and")
    n = ids.shape[-1]
    interventions = [zero_ablation(model.all_heads()[2:], start=n + 1), scale([Head(1, 2)], "value", -3.0),
                     streaming_attention([Head(2, 1), Head(0, 3)], sink=1, recent=2, start=n)]
    with intervene(model, interventions), _bridge_only(model):
        expected = model.generate(ids, max_new_tokens=5)
    assert fused_generate(model, ids, 5, interventions).tolist() == expected.tolist()


# ---- what the path does not serve --------------------------------------------------------------------

def test_pattern_hooks_are_a_fused_path_error(family):
    name, model = family
    ids = model.encode(TEXT)
    _bridge(model, ids, [])
    before = _state(model)
    for intervention in (uniform_attention([Head(0, 0)]), scale([Head(1, 1)], "query", 0.5)):
        assert unserved_reason(model, [intervention]) is None  # served: on the kernel's query
    for point in ("hook_pattern", "hook_attn_scores"):
        with model.hooks(fwd_hooks=[(f"blocks.1.attn.{point}", lambda t, hook: None)]):
            with pytest.raises(FusedPathError, match=f"blocks.1.attn.{point}"):
                fused_logits(model, ids)
    assert issubclass(FusedPathError, ProbeError)
    assert _state(model) == before
    assert unserved_reason(model) is None


def test_nothing_is_left_on_the_model_after_an_error_inside_the_forward(family):
    name, model = family
    ids = model.encode(TEXT)
    clean = _bridge(model, ids, [])
    before = _state(model)
    short = {Head(1, 0): torch.zeros(3, model.d_head)}  # per-position means for 3 positions only
    with pytest.raises(InterventionError, match="cover 3 positions"):
        fused_logits(model, ids, [mean_ablation([Head(1, 0)], short)])
    with pytest.raises(RuntimeError, match="boom"):
        with fused(model, [zero_ablation([Head(0, 0)]), streaming_attention([Head(1, 1)], sink=1, recent=2),
                           uniform_attention([Head(1, 0)]), scale([Head(0, 1)], "query", 0.5)]):
            assert _state(model) != before
            raise RuntimeError("boom")
    assert _state(model) == before
    torch.testing.assert_close(_bridge(model, ids, []), clean)


def test_another_thread_waits_while_a_fused_call_holds_the_model(root):
    """The swap and the hooks live on the shared model: `fused` holds `model.lock` for its whole block, so a
    concurrent bridge forward (another app session) waits and sees the bridge's own attention."""
    import threading

    model, _, _ = loaded_family("llama", root)
    ids = model.encode(TEXT)
    clean = _bridge(model, ids, [])
    results: list[torch.Tensor] = []
    entered = threading.Event()

    def other_session() -> None:
        entered.wait()
        results.append(_bridge(model, ids, []))

    thread = threading.Thread(target=other_session)
    thread.start()
    with fused(model, [zero_ablation(model.all_heads())]):
        entered.set()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # blocked while the HF attention modules are swapped in
    thread.join(timeout=10)
    assert not thread.is_alive()
    torch.testing.assert_close(results[0], clean)


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
    means = head_means(model, reference_prompts(model)[:2], heads[:2])
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


# ---- analyzers on the fused path: their results == the bridge's (fused_routing = False) ---------------

@contextlib.contextmanager
def _entries(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts `probe.fused.fused` blocks entered (every fused forward, routed or partial, enters one)."""
    import probe.fused as module

    entered: list[int] = []
    real = module.fused
    monkeypatch.setattr(module, "fused", lambda *a, **k: entered.append(1) or real(*a, **k))
    yield entered
    monkeypatch.setattr(module, "fused", real)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_ships_scores_on_the_fused_path_equal_the_bridges(name, monkeypatch):
    """Ships (`analyses.safety.ships_query`, both ablations: ε query scaling and output scaling) on the planted
    refusal model (GQA Llama; GPT-NeoX: fused QKV, parallel block), its clean pass and ablated partial
    forwards on the fused path, == the bridge's scores, ≤ 1e-4 of the largest."""
    from analyses import safety
    from analyses.planted import SAFETY_HARMFUL_PROMPTS, safety_model

    model = safety_model(name)
    ids = model.encode(SAFETY_HARMFUL_PROMPTS[0])
    for ablation in ("query", "output"):
        with _bridge_only(model):
            bridge = safety.ships_query(model, ids, ablation, 1e-5)
        with _entries(monkeypatch) as entered:
            ours = safety.ships_query(model, ids, ablation, 1e-5)
        assert len(entered) >= 2  # the clean pass and the ablated batches
        size = float(bridge.nan_to_num().abs().max())
        assert size > 1e-3
        worst = float((ours - bridge).nan_to_num().abs().max()) / size
        assert record(name, f"ships {ablation} fused vs bridge", worst, tolerance=RTOL) <= RTOL


def test_batched_generation_runs_on_the_fused_path_inside_intervene(root, monkeypatch):
    """`probe.generation.greedy_generate` (safety's and factual's generation) in a left-padded batch inside an
    `intervene()` block (zero, uniform, query scaling) == the bridge's tokens."""
    from probe.generation import greedy_generate

    model, _, _ = loaded_family("llama", root)
    texts = list(ROWS)
    interventions = [zero_ablation([Head(1, 1), Head(0, 2)]), uniform_attention([Head(1, 0)]),
                     scale([Head(0, 3)], "query", 1e-5)]
    with intervene(model, interventions):
        with _bridge_only(model):
            expected = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
        with _entries(monkeypatch) as entered:
            got = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
    assert entered == [1] and got == expected
    with _bridge_only(model):
        clean = greedy_generate(model, texts, 6, add_special_tokens=True, stop_ids=())
    assert clean != expected  # the interventions change the tokens


def test_factual_successor_and_cdt_forwards_on_the_fused_path_equal_the_bridges(monkeypatch):
    """The analyzer forwards that read one position now ask `model.logits(..., positions="last")` inside their
    `intervene()` blocks (fused path, one unembedded row): factual's first-token logits (planted factual
    model, value scaling), successor's causal-check probabilities (mean ablation) and CD-T's path patching
    (every head frozen by resample + one sender mean-ablated per row; planted induction model) and task
    accuracy == the bridge's, ≤ 1e-4 relative."""
    from analyses import factual, successor
    from analyses.cdt import patching, tasks
    from analyses.cdt.circuits import batch_means
    from analyses.cdt.planted import induction_batch, planted_induction_model
    from analyses.data.capitals import Capital
    from analyses.factual_planted import PLANTED_TABLE, planted_factual_model

    def both(model: Any, run: Any) -> tuple[Any, Any, int]:
        with _bridge_only(model):
            bridge = run()
        with _entries(monkeypatch) as entered:
            ours = run()
        return bridge, ours, len(entered)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).nan_to_num().abs().max() / b.nan_to_num().abs().max().clamp(min=1e-6))

    model = planted_factual_model()
    pool = [Capital(country, city) for country, city in PLANTED_TABLE]
    prompts = factual.build_counterfactuals(model.tokenizer, pool, 6, seed=3).prompts
    heads = model.all_heads()[:3]
    (pair_b, arg_b), (pair_f, arg_f), n = both(model, lambda: factual.first_token_logits(
        model, prompts, [scale(heads, "value", -1.5)]))
    assert n >= 1 and torch.equal(arg_b, arg_f) and rel(pair_f, pair_b) <= RTOL
    texts = [{"text": "alice bob", "answer_id": 3}, {"text": "bob alice", "answer_id": 4}]
    means = head_means(model, [model.encode(t["text"]) for t in texts], heads)
    probs_b, probs_f, n = both(model, lambda: successor.causal._answer_probabilities(model, texts, [[mean_ablation(heads, means)]])[0])
    assert n >= 1 and rel(probs_f, probs_b) <= RTOL

    induction = planted_induction_model()
    batch = induction_batch(induction, n=4)
    mu = [batch_means(induction, batch)]
    scores_b, scores_f, n = both(induction, lambda: patching.path_patching_scores(induction, [batch], None, mu))
    assert n >= 2 and float(scores_b.nan_to_num().abs().max()) > 1e-3 and rel(scores_f, scores_b) <= RTOL
    acc_b, acc_f, n = both(induction, lambda: tasks.accuracy(induction, [batch]))
    assert n >= 1 and acc_b.keys() == acc_f.keys()
    assert all(abs(acc_f[k] - acc_b[k]) <= RTOL * max(1.0, abs(acc_b[k])) for k in acc_b)


def test_retrieval_masking_runs_on_the_fused_path_and_equals_the_bridges(monkeypatch):
    """Retrieval's masking (`masked_answers`: one prefill, then every condition decodes as a batch row with its
    own heads masked from the answer on, uniform attention and zero ablation) on the fused path == the
    bridge's answers on the planted retrieval head; masking it uniformly breaks the answer."""
    from analyses import retrieval
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    sample = retrieval_samples(model)[0]
    others = [h for h in model.all_heads() if h != RETRIEVAL_HEAD][:2]
    conditions = retrieval.masking_conditions(model, [RETRIEVAL_HEAD, *others], [1], ("uniform", "zero"), 2, 0)
    with _bridge_only(model):
        expected = retrieval.masked_answers(model, sample, conditions, 6, batch=4)
    with _entries(monkeypatch) as entered:
        got = retrieval.masked_answers(model, sample, conditions, 6, batch=4)
    assert len(entered) >= 3 and got == expected
    top = [i for i, c in enumerate(conditions) if c["selection"] == "top" and c["kind"] == "uniform"]
    assert got[top[0]] != got[0]  # the planted head masked: the needle is not copied


def test_duo_niah_with_streaming_heads_runs_on_the_fused_path_and_equals_the_bridges(monkeypatch):
    """Duo's NIAH (`niah_accuracy`: greedy generation inside a block of streaming masks, sink + recent window
    as an SDPA mask; both regimes) on the planted retrieval model == the bridge's recall; streaming the planted
    head from every position on loses the needle."""
    from analyses import duo
    from analyses.planted import RETRIEVAL_HEAD, retrieval_model, retrieval_samples

    model = retrieval_model()
    samples = retrieval_samples(model, lengths=(60,))[:2]
    for regime in ("decode-only", "all-positions"):
        config = duo.DuoConfig(sink=1, recent=3, regime=regime, max_new_tokens=6)
        heads = [RETRIEVAL_HEAD, Head(0, 1)]
        with _bridge_only(model):
            expected = duo.niah_accuracy(model, samples, heads, config)
        with _entries(monkeypatch) as entered:
            got = duo.niah_accuracy(model, samples, heads, config)
        assert len(entered) == len(samples) and got == expected
    full = duo.niah_accuracy(model, samples, [], config)
    assert min(full) > max(got)  # all-positions streaming of the planted head loses the needle
