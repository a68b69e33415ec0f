"""Where fine-tuning changed the weights: relative change per layer, module and attention head."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from analyses.organism.build import _load_base_hf, find_organism
from analyses.organism.config import OrganismConfig, OrganismError
from probe.hf import module_paths


WEIGHT_MODULES: tuple[str, ...] = ("q", "k", "v", "o", "mlp", "ln1", "ln2")


def _relative(delta_sq: float, base_sq: float) -> float:
    return math.sqrt(delta_sq / base_sq) if base_sq > 0 else (0.0 if delta_sq == 0 else math.inf)


@torch.no_grad()
def weight_changes(base_hf: Any, tuned_hf: Any, tokenizer: Any, modules: Sequence[str] = WEIGHT_MODULES,
                   top: int = 10) -> dict[str, Any]:
    """Where plain HF model `tuned_hf` differs from `base_hf` (same family and shapes): relative Frobenius
    change ||W_tuned - W_base||_F / ||W_base||_F per layer x module (all of a module's parameters
    together), per layer, and per attention head (its query, key, value and output slices from the
    architecture layer's stacks, GQA keys/values expanded to the query heads).

    Why: a head-attribution method run on the organism should be read against where fine-tuning
    actually wrote the behaviour; heads it finds outside the changed layers act through what those
    layers read. Modules are architecture-layer component names (`probe.forward.COMPONENTS`), resolved
    by `module_paths`; one the family lacks is skipped. The inputs stay plain (the per-head stacks are
    read from bridged copies).
    """
    import copy

    from probe.architecture import MissingComponentError, architecture

    base_params = dict(base_hf.named_parameters())
    tuned_params = dict(tuned_hf.named_parameters())
    if {n: p.shape for n, p in base_params.items()} != {n: p.shape for n, p in tuned_params.items()}:
        raise OrganismError("The two models differ in parameters or shapes; weight changes need the same model.")
    from probe.models import wrap_hf_model

    stacks = []  # the per-head weights, read through the architecture layer of bridged copies
    for index, hf in enumerate((base_hf, tuned_hf)):
        twin = wrap_hf_model(copy.deepcopy(hf), tokenizer, f"weight-changes-{index}", hub_name="probe/weight-changes",
                             device="cpu", dtype="float32")
        arch = architecture(twin)
        stacks.append([arch.W_Q, arch.W_K_per_query, arch.W_V_per_query, arch.W_O])
        n_layers, n_heads = arch.n_layers, arch.n_heads
        del twin, arch
    layers = list(range(n_layers))
    try:  # one bridged copy for all components; per component only when the family lacks one
        paths = module_paths(base_hf, modules, layers, tokenizer)
    except MissingComponentError:
        paths = {}
        for component in modules:
            try:
                paths.update(module_paths(base_hf, [component], layers, tokenizer))
            except MissingComponentError:
                continue

    def squares(names: Sequence[str]) -> tuple[float, float]:
        return (sum(float((tuned_params[n].float() - base_params[n].float()).pow(2).sum()) for n in names),
                sum(float(base_params[n].float().pow(2).sum()) for n in names))

    rows, per_layer = [], {layer: set() for layer in layers}
    for (component, layer), path in sorted(paths.items(), key=lambda item: (item[0][1], item[0][0])):
        names = [n for n in base_params if n.startswith(f"{path}.")]
        per_layer[layer].update(names)  # a set: a packed qkv projection serving q, k and v counts once
        delta_sq, base_sq = squares(names)
        rows.append({"layer": layer, "module": component, "relative": _relative(delta_sq, base_sq),
                     "absolute": math.sqrt(delta_sq), "parameters": sum(base_params[n].numel() for n in names)})
    layer_rows = [{"layer": layer, "relative": _relative(*squares(sorted(names)))} for layer, names in per_layer.items()]
    delta_sq_heads = sum((y.float() - x.float()).pow(2).flatten(2).sum(-1) for x, y in zip(*stacks))
    base_sq_heads = sum(x.float().pow(2).flatten(2).sum(-1) for x in stacks[0])
    heads = [{"head": f"L{layer}H{head}", "layer": layer,
              "relative": _relative(float(delta_sq_heads[layer, head]), float(base_sq_heads[layer, head]))}
             for layer in layers for head in range(n_heads)]
    rows.sort(key=lambda row: -row["relative"])
    heads.sort(key=lambda row: -row["relative"])
    return {"modules": rows, "heads": heads, "layers": layer_rows, "top_modules": rows[:top],
            "top_heads": heads[:top], "changed_layers": sorted({row["layer"] for row in rows if row["absolute"] > 0})}


def organism_weight_changes(config: OrganismConfig = OrganismConfig(), top: int = 10) -> dict[str, Any]:
    """`weight_changes` of the cached refusal organism (base + its saved delta) against the base SmolLM2;
    never builds it."""
    from safetensors.torch import load_file

    folder = find_organism(config)
    if folder is None:
        raise OrganismError("The refusal organism is not built yet: run `probe organism refusal`.")
    base_hf, tokenizer, _ = _load_base_hf()
    tuned_hf, _, _ = _load_base_hf()
    state = dict(tuned_hf.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(folder / "delta.safetensors")).items():
            state[name].copy_(value.to(state[name].dtype))
    report = weight_changes(base_hf, tuned_hf, tokenizer, top=top)
    report["organism_key"] = json.loads((folder / "meta.json").read_text())["key"]
    report["trained_layers"] = list(config.layers)
    report["trained_modules"] = list(config.modules)
    return report
