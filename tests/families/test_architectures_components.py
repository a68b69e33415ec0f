"""The architecture proof matrix: the components each family adds, the layer's facts, and the docs tables.

Per family of tests/support/families.py (loaded the user's way, `hf:<folder>`, with an independent HF copy):

- every component the family adds (soft-caps, QK-norm, post norms, Gemma's 1 + w, embedding scale,
  sliding windows, partial rotary, parallel block, biases, MoE routing), switched off on the HF copy,
  moves the logits by >= 1e-2: the logits check would see the bridge drop it;
- the architecture layer's facts, its MLP callable and embedding against the model's own modules;
- docs/ARCHITECTURES.md's tables are what tools/architectures_table.py makes from the layer's current
  facts and the committed matrix, every cell within its bound; the matrix keeps the worst value per cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from architectures_helpers import ALL, ATOL, INTERVENTION_CHECKS, TEXT, _patched
from architectures_helpers import _report, family, root  # fixtures: pytest finds them in this module
from families import GQA, N_CTX
from matrix import CELLS, loaded_family, record, record_effect, record_facts
from probe.architecture import MissingComponentError, architecture
from probe.models import LoadedModel


# ---- (d) every component the family adds is visible ----------------------------------------------

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
    moves its logits by >= 1e-2 (tests/support/families.py sharpens weights where a default init hides one),
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


# ---- docs/ARCHITECTURES.md's tables come from tools/architectures_table.py ------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURES.md"
# every check the matrix files (tests/families/test_architectures_*.py) record, as the docs must show it for every family
DEVIATION_CHECKS = ("logits", "left-pad", "zero-head", *[f"intervention: {c}" for c in INTERVENTION_CHECKS],
                    "intervention: scale value (KV group)", "mlp/embed", "successor e(t)", "successor OV",
                    "retrieval argmax≠", "safety Ships", "factual DLA", "duo streaming vs mask", "duo gates vs blend")
EFFECT_CHECKS = (*[f"moves: {c}" for c in INTERVENTION_CHECKS], "moves: duo streaming", "moves: duo gates")


def _table_tool() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "architectures_table.py"
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
