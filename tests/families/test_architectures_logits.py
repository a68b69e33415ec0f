"""The architecture proof matrix: every family users bring, loaded the user's way (`hf:<folder>`).

Per family (tests/support/families.py: 3 layers, d_model 64, 4 query heads, 2 KV heads where the family has
GQA, random weights and random norm weights/biases):

- bridge logits == an independently loaded Hugging Face copy of the same folder (eager, fp32);
- a left-padded batch gives each row's logits alone (the bridge's masked forward, and probe's one
  padded path, `probe.generation.greedy_continuations`);
- every intervention kind (zero / mean / resample / uniform attention, query / value / output scaling),
  per layer and query head, == the same operation done by hand on the HF copy's own modules; no hook
  is left after the block;
- Duo: streaming heads and the gate blend == attention under the streaming mask computed by hand.

The components each family adds, the architecture layer's facts and docs/ARCHITECTURES.md's tables:
tests/families/test_architectures_components.py; the analyzers' paths that read the layer:
tests/families/test_architectures_analyzers.py. The worst deviation of each check is recorded in the shared
matrix (tests/support/matrix.py) and printed at the end of the module (`-s`); with `PROBE_MATRIX_OUT=<file>` the
cells are written there and tools/architectures_table.py turns them into docs/ARCHITECTURES.md's tables.
"""

from __future__ import annotations

from typing import Any

import torch

from architectures_helpers import ATOL, INTERVENTION_CHECKS, TEXT, _patched
from architectures_helpers import _report, family, root  # fixtures: pytest finds them in this module
from families import GQA
from matrix import record, record_effect
from probe.architecture import architecture
from probe.heads import Head
from probe.interventions import intervene, zero_ablation
from probe.models import LoadedModel

ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12",
        "a book")


# ---- (a) the bridge runs the family as Hugging Face does -------------------------------------------

def test_bridge_logits_equal_an_independent_hf_copy(family):
    name, model, copy = family
    ids = model.encode(TEXT)
    assert ids.shape[-1] > 8  # longer than the Gemma windows (8)
    with torch.no_grad():
        diff = (model.logits(ids).float() - copy(ids).logits.float()).abs().max()
    assert record(name, "logits", diff) <= ATOL


def test_family_shape_is_what_the_folder_says(family):
    name, model, _ = family
    assert (model.n_layers, model.n_heads, model.d_model) == (3, 4, 64)
    assert model.n_kv_heads == (2 if name in GQA else 4)


# ---- (b) left padding ------------------------------------------------------------------------------

def _left_padded(model: LoadedModel, texts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rows = [model.encode(t)[0] for t in texts]
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask, rows


def test_left_padded_batch_equals_each_row_alone(family):
    """The bridge's masked forward (it derives positions from the mask, so learned positions and rotary
    both see each row from 0) gives every row's last-position logits as that row alone."""
    name, model, _ = family
    ids, mask, rows = _left_padded(model, ROWS)
    with torch.no_grad(), model.lock:
        batched = model.bridge(ids, attention_mask=mask)[:, -1].float()
    worst = 0.0
    for i, row in enumerate(rows):
        alone = model.logits(row[None])[0, -1].float()
        worst = max(worst, float((batched[i] - alone).abs().max()))
    assert record(name, "left-pad", worst) <= ATOL


def test_probes_padded_generation_equals_each_row_alone(family):
    """probe's one padded batch path (`probe.generation.greedy_continuations`, HF generate on the bridged
    model with left padding) continues every row as that row alone does."""
    from probe.generation import greedy_continuations

    name, model, _ = family
    batched = greedy_continuations(model.hf_model, model.tokenizer, list(ROWS), max_new_tokens=4,
                                   add_special_tokens=True)
    alone = [greedy_continuations(model.hf_model, model.tokenizer, [t], max_new_tokens=4, add_special_tokens=True)[0]
             for t in ROWS]
    assert batched == alone


# ---- (c) a head's zero ablation is what the maths says --------------------------------------------

def test_zero_ablation_equals_zeroing_the_heads_slice_of_the_output_projection(family):
    """Per query head (GQA: heads sharing a KV head are ablated one at a time): probe's hook_z
    intervention == a forward pre-hook on the HF copy's output projection (path from the layer)."""
    name, model, copy = family
    arch = architecture(model)
    ids = model.encode(TEXT)
    layer, dh = 1, model.d_head
    projection = copy.get_submodule(arch.attention(layer).o_path)
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        clean = copy(ids).logits
        for head in range(model.n_heads):
            with intervene(model, [zero_ablation([Head(layer, head)])]):
                ablated = model.logits(ids).float()

            def zero_slice(module: Any, args: tuple[torch.Tensor, ...], head: int = head) -> tuple[torch.Tensor, ...]:
                z = args[0].clone()
                z[..., head * dh:(head + 1) * dh] = 0
                return (z, *args[1:])

            handle = projection.register_forward_pre_hook(zero_slice)
            try:
                expected = copy(ids).logits.float()
            finally:
                handle.remove()
            worst = max(worst, float((ablated - expected).abs().max()))
            moved = max(moved, float((expected - clean).abs().max()))
    assert moved > 1e-3  # the ablation changes the output (a hook can fire and change nothing)
    assert record(name, "zero-head", worst) <= ATOL


# ---- (c') every intervention kind, per query head, against the HF copy's own modules ----------------

def _projection_site(name: str, model: LoadedModel, copy: torch.nn.Module, layer: int,
                     which: str) -> tuple[torch.nn.Module, Any]:
    """(module of the HF copy, index(out, i) -> view of query head i's (`which="q"`) or KV head i's
    (`"v"`) slice of its output): the query after any QK-norm (a scale before it would be normalised
    away), the values as the projection gives them (bias included). Hugging Face layouts on purpose."""
    arch = architecture(model)
    dh, H, K = model.d_head, model.n_heads, model.n_kv_heads
    if arch.attention(layer).qkv_packed:
        module = copy.get_submodule(arch.path("attn.qkv", layer))
        if name == "gpt_neox":  # per head [q_h | k_h | v_h]
            offset = 0 if which == "q" else 2 * dh
            return module, lambda out, i: out.view(*out.shape[:-1], H, 3 * dh)[..., i, offset:offset + dh]
        base = 0 if which == "q" else H * dh + K * dh  # Phi-3, GPT-2: [q heads | k heads | v heads]
        return module, lambda out, i: out[..., base + i * dh: base + (i + 1) * dh]
    norm = arch.norm("q_norm", layer) if which == "q" else None
    if norm is None:
        module = copy.get_submodule(arch.path(f"attn.{which}", layer))
        return module, lambda out, i: out[..., i * dh:(i + 1) * dh]
    module = copy.get_submodule(norm.path)
    if arch.qk_norm(layer) == "whole":  # OLMo-2: one norm over the whole projection
        return module, lambda out, i: out[..., i * dh:(i + 1) * dh]
    # per head: [b, t, H, dh] (Qwen3) or [b, H, t, dh] (Gemma 3, transposed before the norm)
    return module, lambda out, i: out[:, i] if out.shape[1] == H and out.shape[2] != H else out[:, :, i]


def _with_hook(module: torch.nn.Module, fn: Any, pre: bool = False) -> Any:
    return module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)


def _copy_logits(copy: torch.nn.Module, ids: torch.Tensor, module: torch.nn.Module, fn: Any, pre: bool) -> torch.Tensor:
    handle = _with_hook(module, fn, pre)
    try:
        return copy(ids).logits.float()
    finally:
        handle.remove()


def _capture(copy: torch.nn.Module, ids: torch.Tensor, module: torch.nn.Module, pre: bool = False) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: Any, args: Any, out: Any = None) -> None:
        seen["x"] = (args[0] if pre else (out[0] if isinstance(out, tuple) else out)).detach().clone()

    handle = _with_hook(module, grab, pre)
    try:
        copy(ids)
    finally:
        handle.remove()
    return seen["x"]


def _bridge_hook_counts(model: LoadedModel) -> tuple[int, int]:
    """(hooks on the bridge's hook points, hooks on any of its modules)."""
    from probe.interventions import active_hook_count

    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.bridge.modules())
    return active_hook_count(model), modules


SCALE = -1.7  # negative and not 0 / 1: a sign or a missed factor shows
def test_every_intervention_kind_equals_its_hand_computation_on_the_hf_copy(family):
    """Per layer and query head (GQA: one query head of a shared KV head at a time), probe's zero / mean /
    resample / uniform-attention ablation and query / value / output scaling == the HF copy with the same
    operation done by hand on its own modules: z slices at the output projection's input (zero, mean,
    resample, output), z recomputed from the copy's attention weights and its value projection (value:
    s * A_h v_kv(h); uniform: the running mean of v_kv(h) over the visible keys, sliding window included),
    the query head's slice after any QK-norm (query). Scaling a KV head's values on the copy's projection
    == probe's value scale on all query heads of that group. No hook is left after any block, and a
    forward afterwards equals the clean one bit for bit."""
    from probe.interventions import (capture_z, head_means, intervene, mean_ablation, resample_ablation, scale,
                                     uniform_attention)

    name, model, copy = family
    arch = architecture(model)
    dh = model.d_head
    ids = model.encode(TEXT)
    T = ids.shape[-1]
    source = torch.roll(ids, 5, dims=-1)  # a different prompt of the same length (resample)
    references = [torch.roll(ids, k, dims=-1) for k in (3, 11)]
    with torch.no_grad():  # the bridge attaches its own module hooks on first use (a fixed set): warm up first
        model.logits(ids)
        model.run_with_cache(ids)
    baseline_hooks = _bridge_hook_counts(model)
    assert baseline_hooks[0] == 0
    worst = dict.fromkeys(INTERVENTION_CHECKS, 0.0)
    worst["scale value (KV group)"] = 0.0
    moved = dict.fromkeys(INTERVENTION_CHECKS, 0.0)
    with torch.no_grad():
        clean_bridge = model.logits(ids).float()
        clean = copy(ids).logits.float()
        for layer in range(model.n_layers):
            o_proj = copy.get_submodule(arch.attention(layer).o_path)
            z_clean = _capture(copy, ids, o_proj, pre=True)[0]                       # [T, H*dh]
            z_source = _capture(copy, source, o_proj, pre=True)[0]
            z_mean = torch.cat([_capture(copy, r, o_proj, pre=True)[0] for r in references]).mean(0)
            v_module, v_of = _projection_site(name, model, copy, layer, "v")
            v_out = _capture(copy, ids, v_module)
            pattern = copy(ids, output_attentions=True).attentions[layer][0].float()  # [H, T, T]
            window = arch.attention(layer).window
            t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
            visible = (j <= t) & ((t - j < window) if window else True)
            uniform = visible.float() / visible.sum(-1, keepdim=True)
            heads = [Head(layer, h) for h in range(model.n_heads)]
            means = head_means(model, references, heads)
            sources = capture_z(model, source, heads)
            for h, head in enumerate(heads):
                v = v_of(v_out, arch.kv_of(h))[0].float()                            # [T, dh] of its KV head
                hand_z = pattern[h] @ v
                assert torch.allclose(hand_z, z_clean[:, h * dh:(h + 1) * dh].float(), atol=1e-5), (name, layer, h)
                slices = {"zero": torch.zeros(T, dh), "mean": z_mean[h * dh:(h + 1) * dh].expand(T, dh),
                          "resample": z_source[:, h * dh:(h + 1) * dh], "uniform": uniform @ v,
                          "scale value": SCALE * hand_z, "scale output": SCALE * z_clean[:, h * dh:(h + 1) * dh]}
                probes = {"zero": zero_ablation([head]), "mean": mean_ablation([head], means),
                          "resample": resample_ablation([head], sources), "uniform": uniform_attention([head]),
                          "scale value": scale([head], "value", SCALE), "scale output": scale([head], "output", SCALE),
                          "scale query": scale([head], "query", SCALE)}
                for check, intervention in probes.items():
                    with intervene(model, [intervention]):
                        got = model.logits(ids).float()
                    assert _bridge_hook_counts(model) == baseline_hooks, (check, "hook left after the block")
                    if check == "scale query":
                        q_module, q_of = _projection_site(name, model, copy, layer, "q")

                        def scale_q(module: Any, args: Any, out: torch.Tensor, h: int = h) -> torch.Tensor:
                            out = out.clone()
                            q_of(out, h).mul_(SCALE)
                            return out

                        expected = _copy_logits(copy, ids, q_module, scale_q, pre=False)
                    else:
                        def put(module: Any, args: tuple[torch.Tensor, ...], h: int = h,
                                value: torch.Tensor = slices[check]) -> tuple[torch.Tensor, ...]:
                            z = args[0].clone()
                            z[..., h * dh:(h + 1) * dh] = value.to(z.dtype)
                            return (z, *args[1:])

                        expected = _copy_logits(copy, ids, o_proj, put, pre=True)
                    worst[check] = max(worst[check], float((got - expected).abs().max()))
                    moved[check] = max(moved[check], float((expected - clean).abs().max()))
            # a KV head's values scaled on the projection == value scaling of every query head of its group
            for g in range(model.n_kv_heads):
                def scale_v(module: Any, args: Any, out: torch.Tensor, g: int = g) -> torch.Tensor:
                    out = out.clone()
                    v_of(out, g).mul_(SCALE)
                    return out

                expected = _copy_logits(copy, ids, v_module, scale_v, pre=False)
                group = [Head(layer, h) for h in range(model.n_heads) if arch.kv_of(h) == g]
                with intervene(model, [scale(group, "value", SCALE)]):
                    got = model.logits(ids).float()
                worst["scale value (KV group)"] = max(worst["scale value (KV group)"], float((got - expected).abs().max()))
        assert _bridge_hook_counts(model) == baseline_hooks
        assert torch.equal(model.logits(ids).float(), clean_bridge)  # nothing left behind
    for check, value in moved.items():
        record_effect(name, f"moves: {check}", value, minimum=1e-3)
    for check, value in worst.items():
        record(name, f"intervention: {check}", value)
    failures = {check: value for check, value in worst.items() if value > ATOL}
    assert not failures, failures
    assert min(moved.values()) > 1e-3, moved  # each kind changes the output (a hook can fire and change nothing)


# ---- Duo: streaming heads and gate blends against attention under the mask, by hand ---------------

SINK, RECENT = 2, 4


def _hand_attention(copy: torch.nn.Module, transform: Any, seen: dict[str, float]) -> Any:
    """Inside the block, every attention layer of the HF copy runs its own eager attention, then its
    pattern P `[b, H, q, k]` is replaced by `transform(layer, P)` and z recomputed as P' · v (v expanded
    to the query heads as the family's GQA does). `seen["P·v"]` keeps the largest difference between
    the copy's own output and P · v by hand (proving the recomputation path)."""
    import sys

    family_module = sys.modules[type(copy).__module__]
    original = family_module.eager_attention_forward

    def hand(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, *args: Any,
             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = original(attn, query, key, value, mask, *args, **kwargs)
        v = value.repeat_interleave(weights.shape[1] // value.shape[1], dim=1)
        own = (weights @ v).transpose(1, 2)
        seen["P·v"] = max(seen.get("P·v", 0.0), float((own - out).abs().max()))
        new = transform(attn.layer_idx, weights)
        return (new @ v).transpose(1, 2).contiguous(), new

    return _patched([(family_module, "eager_attention_forward", hand)])


def _streamed(pattern: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Softmax restricted to sink ∪ recent, from the full pattern: P·M / (P·M).sum for query rows >= start
    (P is already 0 on future keys and outside a sliding window)."""
    T = pattern.shape[-1]
    t, j = torch.arange(pattern.shape[-2])[:, None] + (T - pattern.shape[-2]), torch.arange(T)[None, :]
    keep = ((j < SINK) | (j > t - RECENT)) & (t >= start)
    kept = pattern * keep
    return torch.where(t >= start, kept / kept.sum(-1, keepdim=True), pattern)


def test_duo_streaming_heads_equal_attention_under_the_streaming_mask(family):
    """Duo's deployment (probe's streaming intervention, sink 2 + recent 4), one query head at a time
    (GQA: heads sharing a KV head separately), every position and decode-only (rows >= T - 4), == the HF
    copy with that head's pattern restricted to sink ∪ recent and renormalised by hand."""
    from probe.interventions import intervene, streaming_attention

    name, model, copy = family
    ids = model.encode(TEXT)
    T = ids.shape[-1]
    assert T > SINK + RECENT + 8
    seen: dict[str, float] = {}
    worst, moved = 0.0, 0.0
    with torch.no_grad():
        clean = copy(ids).logits.float()
        for layer in range(model.n_layers):
            for head, start in [(h, 0) for h in range(model.n_heads)] + [(1, T - 4)]:
                with intervene(model, [streaming_attention([Head(layer, head)], SINK, RECENT, start=start)]):
                    got = model.logits(ids).float()

                def one(l: int, P: torch.Tensor, layer: int = layer, head: int = head, start: int = start) -> torch.Tensor:
                    if l != layer:
                        return P
                    P = P.clone()
                    P[:, head] = _streamed(P[:, head], start)
                    return P

                with _hand_attention(copy, one, seen):
                    expected = copy(ids).logits.float()
                worst = max(worst, float((got - expected).abs().max()))
                moved = max(moved, float((expected - clean).abs().max()))
    assert seen["P·v"] <= 1e-5
    assert record_effect(name, "moves: duo streaming", moved, minimum=1e-3) > 1e-3
    assert record(name, "duo streaming vs mask", worst) <= ATOL


def test_duo_gate_blend_equals_the_blended_patterns_by_hand(family):
    """Duo's training student (gate_hooks, random gates per KV head in every layer at once) == the HF copy
    with every query head's pattern replaced by α P + (1 − α) P_stream, α its KV head's gate (the
    architecture layer's GQA map)."""
    from analyses import duo

    name, model, copy = family
    arch = architecture(model)
    ids = model.encode(TEXT)
    gates = torch.rand(model.n_layers, model.n_kv_heads, generator=torch.Generator().manual_seed(1))
    seen: dict[str, float] = {}
    with torch.no_grad():
        got = model.run_with_hooks(ids, duo.gate_hooks(model, gates, SINK, RECENT)).float()

        def blend(l: int, P: torch.Tensor) -> torch.Tensor:
            alpha = torch.stack([gates[l, arch.kv_of(h)] for h in range(model.n_heads)]).view(1, -1, 1, 1)
            return alpha * P + (1 - alpha) * _streamed(P)

        with _hand_attention(copy, blend, seen):
            expected = copy(ids).logits.float()
        moved = float((expected - copy(ids).logits.float()).abs().max())
    assert record_effect(name, "moves: duo gates", moved, minimum=1e-3) > 1e-3
    assert record(name, "duo gates vs blend", float((got - expected).abs().max())) <= ATOL
