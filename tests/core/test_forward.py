"""probe.forward.run_from_layer on every family (tests/support/families.py): a partial forward from layer k on the
cached residual equals the full forward's final-norm output, and hooks / interventions fire as in a full pass."""

from __future__ import annotations


import pytest
import torch

from matrix import loaded_family, record
from probe.forward import ForwardError, layer_calls, run_from_layer
from probe.heads import Head
from probe.interventions import active_hook_count, intervene, scale, uniform_attention, zero_ablation

TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"
TOL = 1e-5




def _full(model, ids):
    names = {"ln_final.hook_out"} | {f"blocks.{k}.hook_resid_pre" for k in range(model.n_layers)}
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
    return cache


def test_run_from_layer_equals_the_full_forward(family):
    """From layer 0, 1, 2 on the cached `blocks.k.hook_resid_pre`, two identical rows (a batch) == the
    full forward's `ln_final.hook_out` (ids longer than the Gemma windows of 8, so the sliding masks count)."""
    name, model = family
    ids = model.encode(TEXT)
    assert ids.shape[-1] > 8
    with torch.no_grad():
        cache = _full(model, ids)
        final = cache["ln_final.hook_out"]
        worst = 0.0
        for start in (0, 1, 2):
            resid = cache[f"blocks.{start}.hook_resid_pre"].expand(2, -1, -1)
            out = run_from_layer(model, resid, start)
            assert out.shape == (2, ids.shape[-1], model.d_model)
            worst = max(worst, float((out - final).abs().max()))
        assert float(final.abs().max()) > 0.1  # a real output, not zeros
    assert record(name, "forward from layer k", worst, tolerance=TOL) <= TOL
    assert active_hook_count(model) == 0


def test_interventions_and_hooks_fire_as_in_a_full_pass(family):
    """With a per-row head ablation in layer 2 attached, the partial forward from layer 1 gives the full
    ablated pass's output on the ablated row and the clean output on the other; each hook of layers >= 1
    and of ln_final fires once per partial forward, as in the full pass, and no hook of layer 0 fires."""
    name, model = family
    ids = model.encode(TEXT)
    ablation = [zero_ablation([Head(2, 1)], rows=(0,)), scale([Head(1, 3)], "query", 0.0, rows=(0,))]
    with torch.no_grad():
        clean = _full(model, ids)
        with intervene(model, ablation):
            ablated = _full(model, ids)["ln_final.hook_out"]
            counts: dict[str, int] = {}

            def count(tensor, hook):
                counts[hook.name] = counts.get(hook.name, 0) + 1

            with model.hooks([(lambda n: True, count)]):
                out = run_from_layer(model, clean["blocks.1.hook_resid_pre"].expand(2, -1, -1), 1)
            full_counts: dict[str, int] = {}

            def count_full(tensor, hook):
                full_counts[hook.name] = full_counts.get(hook.name, 0) + 1

            with model.hooks([(lambda n: True, count_full)]):
                model.logits(ids)
    moved = float((ablated - clean["ln_final.hook_out"]).abs().max())
    assert moved > 1e-3  # the ablation changes the output
    worst = max(float((out[0] - ablated[0]).abs().max()), float((out[1] - clean["ln_final.hook_out"][0]).abs().max()))
    assert record(name, "forward from layer k, intervened", worst, tolerance=TOL) <= TOL
    expected = {n: c for n, c in full_counts.items() if n.startswith(("blocks.1.", "blocks.2.", "ln_final."))}
    assert counts == expected
    assert any(n.startswith("blocks.2.attn") for n in counts) and "ln_final.hook_out" in counts
    assert active_hook_count(model) == 0


def test_run_from_layer_takes_the_fused_path_where_it_is_exact(family, monkeypatch):
    """Inside an `intervene()` block of per-row head-output, query-scaling and uniform-attention ablations
    (Ships' ablated copies), the partial forward runs on the fused path (`probe.fused.fused` entered once)
    and equals the bridge's partial forward (`fused_routing = False`); a hook on hook_pattern keeps it on the
    bridge."""
    import probe.fused as module

    name, model = family
    ids = model.encode(TEXT)
    entered: list[int] = []
    real = module.fused
    monkeypatch.setattr(module, "fused", lambda *a, **k: entered.append(1) or real(*a, **k))
    ablation = [zero_ablation([Head(2, 1)], rows=(0,)), scale([Head(1, 3)], "query", 1e-5, rows=(1,)),
                uniform_attention([Head(2, 0)], rows=(2,))]
    with torch.no_grad():
        resid = _full(model, ids)["blocks.1.hook_resid_pre"].expand(4, -1, -1)
        with intervene(model, ablation):
            fast = run_from_layer(model, resid, 1)
            assert entered == [1] and not any(r.handed_over for r in model.intervening)
            model.fused_routing = False
            try:
                slow = run_from_layer(model, resid, 1)
            finally:
                model.fused_routing = True
            with model.hooks([("blocks.2.attn.hook_pattern", lambda t, hook: None)]):
                run_from_layer(model, resid, 1)
    assert entered == [1]
    moved = float((slow[:3] - slow[3:]).abs().flatten(1).max(-1).values.min())
    assert moved > 1e-5  # every ablated row differs from the clean row 3 (GPT-2: near-uniform random heads)
    assert record(name, "forward from layer k, fused vs bridge", float((fast - slow).abs().max()), tolerance=TOL) <= TOL
    assert active_hook_count(model) == 0


def test_bad_input_is_a_clear_error(tiny_gqa):
    resid = torch.zeros(1, 4, tiny_gqa.d_model)
    with pytest.raises(ForwardError, match="does not exist"):
        run_from_layer(tiny_gqa, resid, tiny_gqa.n_layers + 1)
    with pytest.raises(ForwardError, match="residual stream"):
        run_from_layer(tiny_gqa, resid[0], 0)
    calls = layer_calls(tiny_gqa, 1, 4)
    assert len(calls) == tiny_gqa.n_layers
    assert [type(m).__name__ for m in tiny_gqa.bridge.blocks] == ["BlockBridge"] * tiny_gqa.n_layers


# ---- plain Hugging Face models (the organism's training path) --------------------------------------

def test_plain_model_states_and_logits_equal_its_forward(family, root):
    """hf_final_states + output_logits (unembedding bias and Gemma 2's final soft-cap) == the plain HF copy's
    own logits, on every family."""
    from probe.hf import hf_final_states, output_logits

    name, model = family
    _, copy, _ = loaded_family(name, root)
    ids = model.encode(TEXT)
    with torch.no_grad():
        diff = float((output_logits(copy, hf_final_states(copy, ids)) - copy(ids).logits.float()).abs().max())
    assert record(name, "plain final states + logits", diff, tolerance=TOL) <= TOL


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "olmo2"])
def test_module_paths_name_modules_of_the_plain_model(name, root):
    """q/k/v/o/mlp resolve to modules of the plain copy (packed qkv where the family packs it), and the
    plain copy is not rewired by the lookup."""
    from probe.architecture import MissingComponentError
    from probe.hf import module_paths

    _, copy, _ = loaded_family(name, root)
    before = sorted(n for n, _ in copy.named_parameters())
    paths = module_paths(copy, ("q", "k", "v", "o", "mlp"), (0, 2))
    modules = dict(copy.named_modules())
    assert all(path in modules for path in paths.values())
    assert sorted(n for n, _ in copy.named_parameters()) == before  # still plain: no bridge wrappers
    packed = name in ("gpt2", "gpt_neox")
    assert (paths[("q", 2)] == paths[("k", 2)]) == packed
    assert paths[("o", 0)] != paths[("q", 0)] and ".2." in paths[("mlp", 2)]
    with pytest.raises(ForwardError, match="do not exist"):
        module_paths(copy, ("q",), (3,))
    with pytest.raises(ForwardError, match="Unknown"):
        module_paths(copy, ("q_proj",), (0,))
    if name == "olmo2":  # norms after the sublayers only: no pre-attention norm to name
        with pytest.raises(MissingComponentError, match="ln1"):
            module_paths(copy, ("ln1",), (0,))
