"""The fused-attention path (probe/fused.py) == the bridge path, on every family of tests/support/families.py.

Per family (loaded the user's way, `load_model("hf:<folder>")`, once per process through tests/support/matrix.py):

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

`LoadedModel.logits` / `generate` routing to this path: tests/core/test_fused_routing.py; the analyzers' results
on it: tests/core/test_fused_analyzers.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from families import FAMILIES, GQA
from fused_helpers import ATOL, FLOOR, ROWS, RTOL, TEXT, _bridge_only
from fused_helpers import root  # a fixture: pytest finds it in this module
from matrix import loaded_family, record
from probe.errors import InterventionError, ProbeError
from probe.fused import FusedPathError, fused, fused_logits, implementation, unserved_reason
from probe.heads import Head
from probe.interventions import (
    capture_z,
    head_means,
    intervene,
    mean_ablation,
    mean_source_prompts,
    resample_ablation,
    scale,
    streaming_attention,
    uniform_attention,
    zero_ablation,
)
from probe.routed_decode import fused_generate

ALL = list(FAMILIES)
SOURCE = "alice gave the book to bob and then went to the park on monday with mary and john " * 3
LAYER = 1
KINDS = ("zero", "mean", "resample", "value", "output", "query", "uniform")
WORST: dict[tuple[str, str], float] = {}


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
    if out and WORST:  # docs/fused.md's agreement table is tied to this file (tests/docs/test_doc_numbers.py)
        _write_table(Path(out), kinds, started, request.session.testsfailed)


def _write_table(out: Path, kinds: list[str], started: tuple[tuple[float, ...], float], failed: int) -> None:
    """WORST as a committed result file: the doc's table must show the numbers a run measured, not retyped ones."""
    import datetime
    import platform
    import sys

    families = [f for f in ALL if any(fam == f for fam, _ in WORST)]
    document = {
        "what": "fused path vs the bridge, largest deviation per family and check (tests/families/test_fused_families.py's "
                "WORST): logits / stream / pad / decode absolute; intervention kinds relative to max(effect, floor), "
                "each query head of layer 1 on its own batch row",
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PROBE_FUSED_TABLE_OUT=" + str(out)
                   + " python -m pytest -q -p no:cacheprovider tests/families/test_fused_families.py -s",
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


def _bridge(model: Any, ids: torch.Tensor, interventions: list[Any]) -> torch.Tensor:
    with torch.no_grad(), intervene(model, interventions), _bridge_only(model):
        return model.logits(ids).float()


def _per_row(model: Any, kind: str, ids: torch.Tensor) -> list[Any]:
    """One intervention of `kind` per query head of LAYER, head h on batch row h (GQA: every head of a
    key/value group on its own)."""
    heads = [Head(LAYER, h) for h in range(model.n_heads)]
    if kind == "mean":
        means = head_means(model, mean_source_prompts(model)[:2], heads)
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
    """`probe.forward.model_final_states` under an intervention, read out by `probe.readout.logits_from_normalized`,
    equals the bridge's logits at the last position; on the fused path the unembedding multiplies no row (the
    point of it: successor's causal check reads every condition out in one product), on the bridge it runs."""
    from probe import readout
    from probe.forward import model_final_states

    name, model = family
    ids = model.encode(TEXT)
    interventions = [scale([Head(LAYER, 0)], "output", -1.5)]
    bridge = _bridge(model, ids, interventions)[:, -1]
    rows: list[int] = []
    handle = model.bridge.unembed.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[1])))
    try:
        with torch.no_grad(), intervene(model, interventions):
            fused_states = model_final_states(model, ids)
            with _bridge_only(model):
                bridge_states = model_final_states(model, ids)
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
