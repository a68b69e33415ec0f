"""The architecture proof matrix: the analyzers' paths that read the architecture layer, on every family.

Per family of tests/support/families.py (loaded the user's way, `hf:<folder>`): successor's e(t) and OV logits
against the model's own modules (hooks, or the HF copy: a different path), retrieval's fast path and
attention geometry against the step-by-step reference and hook_pattern, Ships and factual DLA against
their references; a family the layer does not cover is one clear error naming the component; bf16
models read and run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from architectures_helpers import ATOL, TEXT
from architectures_helpers import _report, family, root  # fixtures: pytest finds them in this module
from families import UNCOVERED, build_folder
from matrix import record
from probe.architecture import MissingComponentError, architecture
from probe.models import LoadedModel, load_model


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
