"""The architecture proof matrix: every family users bring, loaded the user's way (`hf:<folder>`).

Per family (tests/families.py: 3 layers, d_model 64, 4 query heads, 2 KV heads where the family has
GQA, random weights and random norm weights/biases):

- bridge logits == an independently loaded Hugging Face copy of the same folder (eager, fp32);
- a left-padded batch gives each row's logits alone (the bridge's masked forward, and probe's one
  padded path, `probe.generation.greedy_continuations`);
- every intervention kind (zero / mean / resample / uniform attention, query / value / output scaling),
  per layer and query head, == the same operation done by hand on the HF copy's own modules; no hook
  is left after the block;
- every component the family adds (soft-caps, QK-norm, post norms, Gemma's 1 + w, embedding scale,
  sliding windows, partial rotary, parallel block, biases, MoE routing), switched off on the HF copy,
  moves the logits by >= 1e-2: the logits check would see the bridge drop it;
- Duo: streaming heads and the gate blend == attention under the streaming mask computed by hand;
- the architecture layer's facts, and the successor / retrieval paths that read them, against the
  model's own modules (hooks, or the HF copy: a different path).

The worst deviation of each check is recorded in the shared matrix (tests/matrix.py) and printed at
the end of the module (`-s`); with `PROBE_MATRIX_OUT=<file>` the cells are written there and
tools/architectures_table.py turns them into docs/ARCHITECTURES.md's tables.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from families import FAMILIES, GQA, N_CTX, UNCOVERED, build_folder
from matrix import CELLS, format_cells, loaded_family, record, record_effect, record_facts
from probe.architecture import MissingComponentError, architecture
from probe.heads import Head
from probe.interventions import intervene, zero_ablation
from probe.models import LoadedModel, load_model

ALL = list(FAMILIES)
TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12",
        "a book")
ATOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    print("\nlargest deviation (smallest effect) per family x check\n" + format_cells(ALL))


@pytest.fixture(params=ALL)
def family(request: pytest.FixtureRequest, root: Path) -> tuple[str, LoadedModel, torch.nn.Module]:
    """(name, model loaded with `load_model("hf:<folder>")`, independent HF copy), once per process
    (tests/matrix.py)."""
    model, copy, _ = loaded_family(request.param, root)
    return request.param, model, copy


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
    if arch.attention(layer).qkv_fused:
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


INTERVENTION_CHECKS = ("zero", "mean", "resample", "uniform", "scale query", "scale value", "scale output")
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


# ---- (d) every component the family adds is visible ----------------------------------------------

@contextlib.contextmanager
def _patched(changes: list[tuple[Any, str, Any]]) -> Any:
    """Set attributes (module attributes, submodules, a parameter's `.data`) for the block; restore always."""
    old = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in changes]
    try:
        for owner, attr, value in changes:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(old):
            setattr(owner, attr, value)


def _parent(copy: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return copy.get_submodule(head), leaf


def _switch_offs(model: LoadedModel, copy: torch.nn.Module) -> dict[str, list[tuple[Any, str, Any]]]:
    """What each component the architecture layer reports becomes when switched off, as changes to the HF
    copy (Hugging Face names here on purpose: this is the copy the bridge is checked against)."""
    arch = architecture(model)
    facts = arch.summary()
    layers = range(model.n_layers)
    layer_of = [copy.get_submodule(arch.path("attn", l).rpartition(".")[0]) for l in layers]
    out: dict[str, list[tuple[Any, str, Any]]] = {}
    if facts["softcap_attn"]:
        out["attn soft-cap"] = [(copy.get_submodule(arch.path("attn", l)), "attn_logit_softcapping", None) for l in layers]
    if facts["softcap_logits"]:
        out["final soft-cap"] = [(copy.config, "final_logit_softcapping", None)]
    if facts["qk_norm"]:
        out["QK-norm"] = [(*_parent(copy, arch.norm(n, l).path), torch.nn.Identity()) for l in layers
                          for n in ("q_norm", "k_norm")]
    if facts["placement"] in ("post", "both"):
        out["post norms"] = [(*_parent(copy, arch.norm(n, l).path), torch.nn.Identity()) for l in layers
                             for n in ("ln1_post", "ln2_post")]
    if facts["gemma_offset"]:
        norms = [arch.final_norm] + [arch.norm(n, l) for l in layers for n in ("ln1", "ln2", "ln1_post", "ln2_post",
                                                                                 "q_norm", "k_norm")]
        weights = [copy.get_submodule(n.path).weight for n in norms if n is not None and n.offset]
        out["1+w offset"] = [(w, "data", w.data - 1.0) for w in weights]  # (1 + (w - 1)) = w
    if facts["embed_scale"] != 1.0:
        out["embed scale"] = [(copy.get_submodule(arch.path("embed")), "embed_scale", torch.tensor(1.0))]
    if any(facts["windows"]):
        out["sliding window"] = [(copy.config, "sliding_window", 10 * N_CTX)]
    if facts["rotary_dims"] is not None and facts["rotary_dims"] < facts["d_head"]:
        rotary = copy.base_model.rotary_emb
        theta = arch.rotary(0).theta
        full = 1.0 / theta ** (torch.arange(0, model.d_head, 2, dtype=torch.float32) / model.d_head)
        out["partial rotary"] = [(rotary, "inv_freq", full)]  # rotate every dimension instead
    if facts["block"] == "parallel":
        out["parallel block"] = [(layer, "use_parallel_residual", False) for layer in layer_of]
    if arch.b_Q is not None or arch.b_V is not None:
        biased = [m for m in copy.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter)
                  and m.weight.dim() == 2 and not isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding))]
        out["biases"] = [(m.bias, "data", torch.zeros_like(m.bias)) for m in biased]
    if facts["mlp"] == "moe":
        out["MoE top-k"] = [(copy.get_submodule(arch.path("mlp", l)).gate, "top_k", 1) for l in layers]
    return out


SWITCHED = {  # the components each family adds, as the test switches them off
    "llama": set(), "mistral": set(), "phi3": set(),
    "mixtral": {"MoE top-k"}, "qwen3_moe": {"QK-norm", "MoE top-k"},
    "qwen2": {"biases"}, "qwen3": {"QK-norm"}, "olmo2": {"QK-norm", "post norms"},
    "gemma2": {"attn soft-cap", "final soft-cap", "post norms", "1+w offset", "embed scale", "sliding window"},
    "gemma3": {"QK-norm", "post norms", "1+w offset", "embed scale", "sliding window"},
    "gpt_neox": {"partial rotary", "parallel block", "biases"}, "gpt2": {"biases"},
}
SWITCH_MINIMUM = 1e-2  # 100x the logits tolerance


def test_switching_off_a_component_moves_the_logits_far_beyond_the_tolerance(family):
    """Each component the family adds (soft-caps, QK-norm, post norms, Gemma's 1 + w, embedding scale,
    sliding windows, partial rotary, parallel block, biases, MoE top-k), switched off on the HF copy,
    moves its logits by >= 1e-2 (tests/families.py sharpens weights where a default init hides one),
    while the bridge equals the unmodified copy within 1e-4: the logits check would see it dropped."""
    name, model, copy = family
    ids = model.encode(TEXT)
    switches = _switch_offs(model, copy)
    assert set(switches) == SWITCHED[name]
    with torch.no_grad():
        clean = copy(ids).logits.float()
        for component, changes in switches.items():
            with _patched(changes):
                off = copy(ids).logits.float()
            record_effect(name, f"off: {component}", float((off - clean).abs().max()), minimum=SWITCH_MINIMUM)
        bridge = model.logits(ids).float()
        assert torch.equal(copy(ids).logits.float(), clean)  # every change was undone
    assert record(name, "logits", float((bridge - clean).abs().max())) <= ATOL
    small = {c: v for c, v in CELLS[name].items() if c.startswith("off: ") and v < SWITCH_MINIMUM}
    assert not small, small


# ---- the layer's facts -----------------------------------------------------------------------------

EXPECTED_FACTS = {
    # family: (block, norm kind, placement, qk-norm, Gemma offset, rotary dims, mlp kind, fused qkv)
    "llama": ("sequential", "rms", "pre", None, 0.0, 16, "gated", False),
    "mistral": ("sequential", "rms", "pre", None, 0.0, 16, "gated", False),
    "mixtral": ("sequential", "rms", "pre", None, 0.0, 16, "moe", False),
    "qwen2": ("sequential", "rms", "pre", None, 0.0, 16, "gated", False),
    "qwen3": ("sequential", "rms", "pre", "per-head", 0.0, 16, "gated", False),
    "qwen3_moe": ("sequential", "rms", "pre", "per-head", 0.0, 16, "moe", False),
    "gemma2": ("sequential", "rms", "both", None, 1.0, 16, "gated", False),
    "gemma3": ("sequential", "rms", "both", "per-head", 1.0, 16, "gated", False),
    "phi3": ("sequential", "rms", "pre", None, 0.0, 16, "gated", True),
    "olmo2": ("sequential", "rms", "post", "whole", 0.0, 16, "gated", False),
    "gpt_neox": ("parallel", "layer", "pre", None, 0.0, 4, "plain", True),
    "gpt2": ("sequential", "layer", "pre", None, 0.0, None, "plain", True),
}


def _docs_facts(model: LoadedModel) -> dict[str, Any]:
    """The layer's facts as docs/ARCHITECTURES.md's family × component table shows them."""
    arch = architecture(model)
    mlp = arch.mlp(0)
    return {**arch.summary(), "experts": mlp.n_experts, "top_k": mlp.top_k,
            "learned_positions": arch.has_learned_positions}


def test_architecture_facts(family):
    name, model, copy = family
    arch = architecture(model)
    assert architecture(model) is arch  # cached per model
    assert architecture(model, refresh=True) is not arch
    arch = architecture(model)
    facts = arch.summary()
    record_facts(name, _docs_facts(model))
    got = (facts["block"], facts["norm"], facts["placement"], facts["qk_norm"], facts["gemma_offset"],
           facts["rotary_dims"], facts["mlp"], facts["qkv_fused"])
    assert got == EXPECTED_FACTS[name]
    assert arch.W_Q.shape == (3, 4, 64, 16) and arch.W_O.shape == (3, 4, 16, 64)
    assert arch.W_K.shape == arch.W_V.shape == (3, model.n_kv_heads, 64, 16)
    assert [arch.kv_of(h) for h in range(4)] == ([0, 0, 1, 1] if name in GQA else [0, 1, 2, 3])
    assert arch.W_V_per_query.shape == arch.W_K_per_query.shape == (3, 4, 64, 16)
    assert torch.equal(arch.W_V_per_query[1, 3], arch.W_V[1, arch.kv_of(3)])
    torch.testing.assert_close(arch.OV(1, 3), arch.W_V[1, arch.kv_of(3)] @ arch.W_O[1, 3])
    assert facts["embed_scale"] == (8.0 if name.startswith("gemma") else 1.0)
    # every path names a module of the independent copy, and the norms' weights are the copy's
    for component in ("attn", "attn.o", "mlp"):
        copy.get_submodule(arch.path(component, 0))
    for norm in ("ln1", "ln2", "ln1_post", "ln2_post", "q_norm", "k_norm"):
        found = arch.norm(norm, 0)
        if found is not None:
            stored = copy.get_submodule(found.path).weight.float()
            assert torch.allclose(found.weight.float(), stored + found.offset)
    with pytest.raises(MissingComponentError, match="blocks.0.attn.nothing"):
        arch.path("attn.nothing", 0)


def test_mlp_and_embedding_equal_the_hf_copys_modules(family):
    """The layer's MLP callable (MoE included: it takes [n, d] and hides tuple outputs) and embedding
    == the HF copy's own modules on the same input."""
    name, model, copy = family
    arch = architecture(model)
    torch.manual_seed(0)
    x = torch.randn(7, 64)
    worst = 0.0
    with torch.no_grad():
        for layer in range(model.n_layers):
            reference = copy.get_submodule(arch.path("mlp", layer))(x[None])
            reference = reference[0] if isinstance(reference, tuple) else reference
            worst = max(worst, float((arch.mlp(layer)(x) - reference[0]).abs().max()))
        ids = model.encode(TEXT)[0]
        embedded = copy.get_input_embeddings()(ids)
        worst = max(worst, float((arch.embed(ids) - embedded).abs().max()))
    assert record(name, "mlp/embed", worst) <= ATOL


# ---- successor heads on the layer ------------------------------------------------------------------

def _task_ids(model: LoadedModel, n: int = 6) -> list[int]:
    from analyses.data.succession import build_tasks

    ids = [i for task in build_tasks(model.tokenizer, number_max=20).tasks for i in task.token_ids]
    return list(dict.fromkeys(ids))[:n]


def _one_token_run(model: LoadedModel, ids: list[int], hooks: list[tuple[str, Any]], keep: list[str]) -> dict[str, torch.Tensor]:
    """Each token alone as a one-token context (batch of [n, 1]) through the bridge, with `hooks`;
    the hook values named in `keep`. Learned positions (GPT-2) are zeroed: e(t) has none."""
    seen: dict[str, torch.Tensor] = {}

    def grab(tensor: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = tensor[:, 0].detach().float().clone()

    extra = [("hook_pos_embed", lambda t, hook: torch.zeros_like(t))] if "hook_pos_embed" in model.bridge.hook_dict \
        and architecture(model).has_learned_positions else []
    with torch.no_grad():
        model.run_with_hooks(torch.tensor(ids)[:, None], fwd_hooks=[*extra, *hooks, *[(k, grab) for k in keep]])
    canonical = {k: model.bridge.hook_dict[k].name for k in keep}
    return {k: seen[canonical[k]] for k in keep}


def test_successor_effective_embedding_equals_the_models_own_block0(family):
    """e(t) from the layer == the bridge's own block 0 on the token alone (hooks): with attention 0
    and the residual, `hook_resid_post`; MLP0 alone, `resid_post - resid_pre` with attention 0's
    output zeroed."""
    from analyses import successor

    name, model, _ = family
    ids = _task_ids(model)
    full = successor.effective_embeddings(model, ids, include_residual=True, include_attn0=True)
    mlp0 = successor.effective_embeddings(model, ids)
    got = _one_token_run(model, ids, [], ["blocks.0.hook_resid_post"])
    worst = float((full - got["blocks.0.hook_resid_post"]).abs().max())
    zeroed = _one_token_run(model, ids, [("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))],
                            ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"])
    worst = max(worst, float((mlp0 - (zeroed["blocks.0.hook_resid_post"] - zeroed["blocks.0.hook_resid_pre"])).abs().max()))
    assert record(name, "successor e(t)", worst) <= ATOL


def test_successor_ov_logits_equal_the_models_own_attention(family):
    """Every head's effective OV logits ("module" convention, value biases on) == the bridge's own layer on e(t) as a
    one-token context (residual entering the layer replaced by e(t), every other head's z zeroed, the
    head-free output subtracted), through the HF copy's final norm and unembedding."""
    from analyses import successor

    name, model, copy = family
    arch = architecture(model)
    ids = _task_ids(model)
    E = successor.effective_embeddings(model, ids)
    fast = successor.ov_logits(successor.build_circuit(model), E, ids, "module", include_biases=True)  # b_V is in z
    final = copy.get_submodule(arch.path("ln_final"))
    columns = copy.get_submodule(arch.path("unembed")).weight[torch.tensor(ids)].T.float()
    worst = 0.0
    for layer in range(model.n_layers):
        def put(t: torch.Tensor, hook: Any) -> torch.Tensor:
            return E[:, None].to(t.dtype)

        outputs = {}
        for keep in [None, *range(model.n_heads)]:
            def only(z: torch.Tensor, hook: Any, keep: int | None = keep) -> torch.Tensor:
                mask = torch.zeros(z.shape[-2], 1, dtype=z.dtype)
                if keep is not None:
                    mask[keep] = 1
                return z * mask

            hooks = [(f"blocks.{layer}.hook_resid_pre", put), (f"blocks.{layer}.attn.hook_z", only)]
            outputs[keep] = _one_token_run(model, ids, hooks, [f"blocks.{layer}.hook_attn_out"])[f"blocks.{layer}.hook_attn_out"]
        for head in range(model.n_heads):
            with torch.no_grad():
                logits = final(outputs[head] - outputs[None]).float() @ columns
            worst = max(worst, float((fast[layer, head] - logits).abs().max()))
    assert record(name, "successor OV", worst) <= ATOL


def test_successor_runs_on_every_family(family):
    from analyses import successor

    name, model, _ = family
    config = successor.SuccessorConfig(number_max=20, run_probe=False, run_arithmetic=False, run_causal=False)
    result = successor.run(model, config)
    assert result.scores.scores.shape == (3, 4) and sum(result.n_scored.values()) > 0


# ---- retrieval heads on the layer ------------------------------------------------------------------

def _sample_with_ids(ids: torch.Tensor, span: tuple[int, int]) -> Any:
    """A NIAH sample carrying this model's token ids and an answer span (random weights: no real needle)."""
    import dataclasses

    from analyses.data.haystack import build_sample
    from analyses.planted import RETRIEVAL_NEEDLE, retrieval_model, retrieval_sentences

    template = build_sample(retrieval_model().tokenizer, RETRIEVAL_NEEDLE, 40, 50, "base", retrieval_sentences(), 0, 0)
    return dataclasses.replace(template, input_ids=tuple(ids[0].tolist()), answer_tokens=span)


def test_retrieval_fast_path_equals_the_step_by_step_reference(family, monkeypatch):
    """Cached decode with each step's own attention-row argmax (from the fused kernel's own q and k,
    `probe.fused.kernel_pattern`) == a full forward per step (no cache) reading the full hook_pattern: same
    greedy answer, same argmax key for every layer, head, step. The decode ran on the fused path."""
    import contextlib

    from analyses import retrieval

    name, model, _ = family
    ids = model.encode(" ".join(["the capital of mary is the book of john and the key to the park"] * 2))
    sample = _sample_with_ids(ids, (3, 8))
    entered, original = [], retrieval.detect.fused

    @contextlib.contextmanager
    def counted(*args, **kwargs):
        with original(*args, **kwargs) as state:
            entered.append(kwargs.get("observers") is not None)
            yield state

    rows_read, pattern = [], retrieval.detect.kernel_pattern

    def read(*args, **kwargs):
        rows_read.append(1)
        return pattern(*args, **kwargs)

    monkeypatch.setattr(retrieval.detect, "fused", counted)
    monkeypatch.setattr(retrieval.detect, "kernel_pattern", read)
    fast = retrieval.fast_sample(model, sample, 8, stop=False)
    assert entered == [True] and len(rows_read) == 8 * model.n_layers, (entered, len(rows_read))  # no fallback
    slow = retrieval.reference_sample(model, sample, 8, stop=False)
    assert len(fast.answer_ids) == 8 and fast.answer_ids == slow.answer_ids
    assert fast.argmax.shape == (3, 4, 8)
    mismatched = int((fast.argmax != slow.argmax).sum())
    record(name, "retrieval argmax≠", mismatched, tolerance=0)
    assert mismatched == 0
    assert torch.equal(fast.events, slow.events) and torch.equal(fast.unique, slow.unique)


def test_attention_geometry_from_the_layer_recomputes_the_models_pattern(family):
    """The layer's scaling / soft-cap / window per layer: rows recomputed from the hooked (rotated)
    q and k == hook_pattern. Fused-qkv families (Phi-3, GPT-NeoX): the bridge never fires hook_rot_q,
    so there are no rotated queries to recompute from (the fast path does not need them)."""
    from analyses.retrieval import answer_rows, attention_geometry

    name, model, _ = family
    rotary = architecture(model).rotary(0) is not None
    q_name, k_name = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
    ids = model.encode(TEXT)
    names = [f"blocks.{layer}.attn.{n}" for layer in range(model.n_layers) for n in (q_name, k_name, "hook_pattern")]
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    if f"blocks.0.attn.{q_name}" not in cache.keys():
        pytest.skip(f"{name}: the bridge does not fire {q_name} (fused qkv)")
    geometry = attention_geometry(model)
    first, worst = 4, 0.0
    for layer in range(model.n_layers):
        q = cache[f"blocks.{layer}.attn.{q_name}"][0, first:]
        k = cache[f"blocks.{layer}.attn.{k_name}"][0]
        rows = answer_rows(q, k, first, geometry[layer], model.group_size)
        worst = max(worst, float((rows - cache[f"blocks.{layer}.attn.hook_pattern"][0, :, first:]).abs().max()))
    assert record(name, "attn rows", worst, tolerance=1e-5) <= 1e-5


# ---- a family the layer does not cover -------------------------------------------------------------

@pytest.mark.parametrize("name", list(UNCOVERED))
def test_an_uncovered_family_is_one_clear_error_naming_the_component(name, root):
    """A state-space model boots in the bridge but has no attention: the layer, successor and retrieval
    each raise a ProbeError naming the missing component (not AttributeError / ValueError)."""
    from analyses import retrieval, successor
    from probe.errors import ProbeError

    model = load_model(f"hf:{build_folder(name, root)}", device="cpu")
    with pytest.raises(MissingComponentError, match=r"blocks\.0\.attn"):
        architecture(model)
    with pytest.raises(successor.UnsupportedArchitectureError, match=r"blocks\.0\.attn"):
        successor.run(model, successor.SuccessorConfig(number_max=20, run_probe=False, run_arithmetic=False,
                                                       run_causal=False))
    sample = _sample_with_ids(model.encode("the capital of mary is the book"), (1, 3))
    with pytest.raises(ProbeError, match=r"blocks\.0\.attn"):
        retrieval.fast_sample(model, sample, 2)


# ---- the other analyzers' fast paths on every family ----------------------------------------------

def test_safety_ships_fast_path_equals_its_reference(family):
    """Query-level Ships (batched ablated rows; from the cached residual on Llama-like models) == one
    full forward per ablated head."""
    from analyses import safety

    name, model, _ = family
    ids = model.encode("the capital of mary is the book of john")
    fast, slow = safety.ships_query(model, ids), safety.ships_query_reference(model, ids)
    assert fast.shape == (3, 4) and float(slow.abs().max()) > 0
    assert record(name, "safety Ships", float((fast - slow).abs().max())) <= ATOL


def test_factual_attribution_equals_removing_the_direct_path(family):
    """All-heads direct logit attribution == per-head forwards with the head's direct path removed
    (final norm frozen), every head."""
    from analyses import factual

    name, model, _ = family
    vocab = model.tokenizer.get_vocab()
    prompt = factual.CounterfactualPrompt("mary", ("book",), "key", "the capital of mary is the key . q: what",
                                          vocab["book"], vocab["key"], False)
    attribution = factual.head_attribution(model, [prompt])
    assert attribution.per_prompt.abs().max() > 1e-3
    worst = max(abs(factual.reference_direct_effect(model, prompt, head) - float(attribution.per_prompt[0, head.layer, head.head]))
                for head in model.all_heads())
    assert record(name, "factual DLA", worst) <= ATOL


@pytest.mark.parametrize("name", ["gemma3", "olmo2", "mixtral"])
def test_bfloat16_models_read_and_run(name, root):
    """bf16 rounding does not hide Gemma's 1 + w offset, and the layer's modules run in the model's dtype
    (OLMo-2 has no pre-MLP norm to cast for it; MoE in bf16)."""
    from analyses import successor

    model = load_model(f"hf:{build_folder(name, root)}", device="cpu", dtype="bfloat16")
    arch = architecture(model)
    assert arch.final_norm.offset == (1.0 if name.startswith("gemma") else 0.0)
    e = successor.effective_embeddings(model, [5, 6], include_residual=True, include_attn0=True)
    assert e.dtype == torch.float32 and torch.isfinite(e).all()
    config = successor.SuccessorConfig(number_max=20, run_probe=False, run_arithmetic=False, run_causal=False)
    assert successor.run(model, config).scores.scores.shape == (3, 4)


# ---- docs/ARCHITECTURES.md's tables come from tools/architectures_table.py ------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md"
# every check this file records, as the docs must show it for every family
DEVIATION_CHECKS = ("logits", "left-pad", "zero-head", *[f"intervention: {c}" for c in INTERVENTION_CHECKS],
                    "intervention: scale value (KV group)", "mlp/embed", "successor e(t)", "successor OV",
                    "retrieval argmax≠", "safety Ships", "factual DLA", "duo streaming vs mask", "duo gates vs blend")
EFFECT_CHECKS = (*[f"moves: {c}" for c in INTERVENTION_CHECKS], "moves: duo streaming", "moves: duo gates")


def _table_tool() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "architectures_table.py"
    spec = importlib.util.spec_from_file_location("architectures_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_docs_family_component_table_is_what_the_script_makes_from_the_current_facts(root):
    tool = _table_tool()
    facts = {name: _docs_facts(loaded_family(name, root)[0]) for name in ALL}
    assert tool.section(DOCS.read_text(), "facts") == tool.facts_table(facts)


def test_docs_deviation_and_effect_cells_are_within_their_bounds():
    """Read back cell by cell (not by string search): every deviation <= its tolerance, every effect >=
    its minimum, and every family has every check this file records, switch-offs included."""
    tool = _table_tool()
    text = DOCS.read_text()
    tables = tool.parse_tables(text)
    assert set(ALL) <= set(tables["cells"])
    for check in DEVIATION_CHECKS + EFFECT_CHECKS:
        assert check in tables["checks"], check
        assert all(check in tables["cells"][name] for name in ALL), check
    for name in ALL:
        for component in SWITCHED[name]:
            assert f"off: {component}" in tables["cells"][name], (name, component)
    outside = {}
    for name, row in tables["cells"].items():
        for check, value in row.items():
            bound = tables["bounds"][name][check]
            if not (value <= bound if tables["checks"][check]["kind"] == "deviation" else value >= bound):
                outside[(name, check)] = (value, bound)
    assert not outside, outside
    # the family × analyzer table is what the number tables give
    assert tool.section(text, "analyzers") == tool.analyzer_table(tables)
    assert tables["checks"]["logits"] == {"kind": "deviation", "bound": ATOL}
    assert tables["checks"]["retrieval argmax≠"]["bound"] == 0
    assert all(tables["checks"][f"off: {c}"]["bound"] == SWITCH_MINIMUM for n in ALL for c in SWITCHED[n])


def test_table_script_reads_back_what_it_writes():
    """Per-cell bounds, a `|` in a check name, missing cells and a cell outside its bound survive the
    round trip through markdown."""
    tool = _table_tool()
    matrix = {"checks": {"a|b": {"kind": "deviation", "bound": 1e-4}, "moved": {"kind": "effect", "bound": 1e-2}},
              "cells": {"llama": {"a|b": 0.0, "moved": 0.5}, "mixtral": {"a|b": 3e-6}, "gpt2": {"a|b": 2e-4}},
              "bounds": {"llama": {"a|b": 1e-4, "moved": 1e-2}, "mixtral": {"a|b": 1e-5}, "gpt2": {"a|b": 1e-4}},
              "facts": {}}
    text = "x\n" + "\n".join(f"<!-- matrix:{n}:begin -->\n<!-- matrix:{n}:end -->"
                              for n in ("facts", "analyzers", "deviations", "effects"))
    tables = tool.parse_tables(tool.render(text, matrix))
    assert tables["cells"] == matrix["cells"] and tables["bounds"] == matrix["bounds"]
    assert tool.section(tool.render(text, matrix), "analyzers").splitlines()[2:] == [
        "| Llama | ✓ 2 |", "| Mixtral | ✓ 1 |", "| GPT-2 | ✗ 1/1 |"]
    assert tables["checks"]["moved"] == {"kind": "effect", "bound": 1e-2}
    assert "2.0e-04 ✗" in tool.section(tool.render(text, matrix), "deviations")


def test_matrix_keeps_the_worst_value_per_cell_and_merges_runs(tmp_path):
    """record keeps the largest deviation, record_effect the smallest effect, a check cannot be both, and
    a run written into an existing file replaces only the cells it measured."""
    import json

    import matrix

    family = "_matrix_unit"
    try:
        for value in (2e-6, 5e-6, 1e-6):
            matrix.record(family, "_dev", value)
        for value in (0.5, 0.02, 0.7):
            matrix.record_effect(family, "_eff", value, minimum=1e-2)
        matrix.record(family, "_loose", 1e-5, tolerance=1e-3)
        assert matrix.CELLS[family] == {"_dev": 5e-6, "_eff": 0.02, "_loose": 1e-5}
        assert matrix.BOUNDS[family] == {"_dev": 1e-4, "_eff": 1e-2, "_loose": 1e-3}
        with pytest.raises(ValueError, match="both"):
            matrix.record_effect(family, "_dev", 1.0)
        path = tmp_path / "m.json"
        path.write_text(json.dumps({"checks": {"_old": {"kind": "deviation", "bound": 1e-4}},
                                    "cells": {family: {"_old": 3e-7, "_dev": 9.0}}, "bounds": {}, "facts": {}}))
        matrix.write(path)
        written = json.loads(path.read_text())
        assert written["cells"][family] == {"_old": 3e-7, "_dev": 5e-6, "_eff": 0.02, "_loose": 1e-5}
        assert written["checks"]["_eff"] == {"kind": "effect", "bound": 1e-2}
    finally:
        for part in (matrix.CELLS, matrix.BOUNDS):
            part.pop(family, None)
        for check in ("_dev", "_eff", "_loose"):
            matrix.CHECKS.pop(check, None)
