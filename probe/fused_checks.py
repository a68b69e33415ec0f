"""What the fused path (`probe.fused`) can serve on a model now, and why not where it cannot.

Every intervention kind is served (head outputs at the output projection's input, streaming heads as
masks, uniform attention and query scaling on the kernel's query); what sends a forward to the bridge
is a hook the fused path would skip (hook points of the bridge's attention component that the Hugging
Face module never calls), a hook on `hook_z` that must run before a head-output intervention,
`output_attentions`, or query-level interventions on an eager kernel the family does not export.
`unserved_reason` answers from the model's module structure, walked once per model and cached.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from probe.architecture import architecture
from probe.errors import ProbeError
from probe.head_ops import ON_Z, Intervention, Kind
from probe.loaded import LoadedModel

# uniform attention and query scaling act on the query the kernel receives (after the family's norms and
# rotary): a zero query gives every visible key the score 0 (exact uniform attention, the running mean of
# the visible values); a query scaled by s scales every score by s (before a soft-cap, as the bridge's)
ON_QUERY = frozenset({Kind.UNIFORM, Kind.SCALE_QUERY})


class FusedPathError(ProbeError):
    """This forward needs the attention pattern (or a hook the fused path never fires): use the bridge."""


# ---- what the path can serve ------------------------------------------------------------------------

def unserved_reason(model: LoadedModel, interventions: Sequence[Intervention] = ()) -> str | None:
    """Why the fused path cannot run these interventions on `model` now (None: it can). Callers that pick
    a path ask this instead of catching `FusedPathError`. Cheap (no walk over the model's modules: the
    structure it checks is cached per model, `_structure`), so the core may ask before every forward."""
    structure = _structure(model)
    if structure.slots is None:
        return (f"{model.spec}: the bridge's attention components could not be matched to the Hugging Face "
                "layers' attention slots (one per layer, each with a layer_idx)")
    hooked = _hooks_that_would_not_fire(model, structure)
    if hooked:
        shown = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
        return f"hooks are attached to {shown}, which the fused path never calls; run the bridge"
    ordered = _hooks_before_the_head_ops(model, interventions, structure)
    if ordered:
        return (f"hooks on {', '.join(ordered[:3])} would run after the head-output interventions on the fused "
                "path (the bridge runs them in the order they were attached); run the bridge")
    if any(getattr(config, "output_attentions", False) for config in structure.configs):
        return "output_attentions is on: the attention weights need the eager bridge"
    if any(i.kind in ON_QUERY for i in interventions) and structure.kernel == "eager":
        missing = sorted({type(original).__module__ for *_, original in structure.slots
                          if not callable(getattr(sys.modules.get(type(original).__module__), "eager_attention_forward",
                                                  None))})
        if missing:
            return (f"query-level interventions on the eager kernel need the family's eager_attention_forward, "
                    f"which {', '.join(missing)} lacks; run the bridge")
    return None


def check_served(model: LoadedModel, interventions: Sequence[Intervention] = ()) -> None:
    """Raise `FusedPathError` (one line, naming the cause) where `unserved_reason` gives one."""
    reason = unserved_reason(model, interventions)
    if reason is not None:
        raise FusedPathError(reason + ".")


def implementation(model: LoadedModel) -> str:
    """The HF attention kernel the fused path uses: "sdpa", or "eager" where a layer soft-caps its attention
    logits (SDPA has no soft-cap: Gemma 2) or the model has no SDPA support."""
    arch = architecture(model)
    if not getattr(model.hf_model, "_supports_sdpa", False):
        return "eager"
    if any(arch.attention(layer).softcap for layer in range(model.n_layers)):
        return "eager"
    return "sdpa"


def _attention_bridges(model: LoadedModel) -> list[nn.Module]:
    return [block.attn for block in model.bridge.blocks]


def _original(attn: nn.Module) -> nn.Module | None:
    return getattr(attn, "original_component", None)


def handed_over_points(model: LoadedModel) -> dict[int, int]:
    """Hooks of open `intervene()` blocks whose forwards the core hands to this path (`id(point)` -> count):
    switched off while handed over (`probe.interventions.Attached`), so they neither fire nor block it."""
    counts: dict[int, int] = {}
    for record in getattr(model, "intervening", ()):
        if record.handed_over:
            for point, n in record.points.items():
                counts[point] = counts.get(point, 0) + n
    return counts


def _n_hooks(module: nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


Slot = tuple[nn.Module, str, nn.Module, nn.Module]  # HF parent, slot name, bridge attention, HF attention


@dataclass
class _Structure:
    """What the checks read from the model's module tree, found once per model (walking SmolLM2's ~3,000
    modules took ~20 ms, and `LoadedModel.logits` asks before every forward). Valid while `key` (the
    bridge's attention components and the HF modules they wrap) is unchanged and every slot still holds
    its bridge component; `_structure` checks both (O(layers)) on each use and rebuilds otherwise."""

    key: tuple[int, ...]
    slots: list[Slot] | None
    watched: list[tuple[nn.Module, str]]  # modules the fused path skips (hook points ...), with their names
    hook_z: list[nn.Module | None]  # blocks.{l}.attn.hook_z per layer
    configs: list[Any]
    kernel: str


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, _Structure] = weakref.WeakKeyDictionary()


def _structure_key(model: LoadedModel) -> tuple[int, ...]:
    attns = _attention_bridges(model)
    return (id(model.hf_model), *(id(a) for a in attns), *(id(_original(a)) for a in attns))


def _in_place(slots: list[Slot] | None) -> bool:
    return slots is not None and all(parent._modules.get(name) is attn for parent, name, attn, _ in slots)


def _structure(model: LoadedModel) -> _Structure:
    """The cached structure of `model` (rebuilt when it no longer matches the model, see `_Structure`)."""
    key = _structure_key(model)
    cached = _STRUCTURES.get(model.bridge)
    if cached is not None and cached.key == key and _in_place(cached.slots):
        return cached
    built = _build_structure(model, key)
    if built.slots is not None:  # a model whose slots do not match (or are swapped out right now) is re-read
        _STRUCTURES[model.bridge] = built
    return built


def _build_structure(model: LoadedModel, key: tuple[int, ...]) -> _Structure:
    from transformer_lens.hook_points import HookPoint

    names = {id(point): name for name, point in model.bridge.hook_dict.items()}
    watched: list[tuple[nn.Module, str]] = []
    for attn in _attention_bridges(model):
        original = _original(attn)
        inside = {id(m) for m in original.modules()} if original is not None else set()
        for name, module in attn.named_modules():
            if id(module) in inside:
                continue
            if isinstance(module, HookPoint):
                watched.append((module, names.get(id(module), f"{attn.name}.{name}")))
            else:
                watched.append((module, f"{attn.name}.{name}".rstrip(".") + f" (a torch hook on {type(module).__name__})"))
    hook_z = [model.bridge.hook_dict.get(f"blocks.{layer}.attn.hook_z") for layer in range(model.n_layers)]
    return _Structure(key, _scan_slots(model), watched, hook_z, _scan_configs(model), implementation(model))


def _hooks_that_would_not_fire(model: LoadedModel, structure: _Structure | None = None) -> list[str]:
    """Modules inside the bridge's attention components, outside the HF attention module they wrap, that
    have a hook attached (hook points, or plain torch hooks on the component's own modules): the fused
    path skips the component, so these would not fire. Handed-over `intervene()` hooks do not count."""
    structure = structure or _structure(model)
    allowed = handed_over_points(model)
    return [name for module, name in structure.watched if _n_hooks(module) > allowed.get(id(module), 0)]


def _hooks_before_the_head_ops(model: LoadedModel, interventions: Sequence[Intervention],
                               structure: _Structure | None = None) -> list[str]:
    """`hook_z` points of layers with head-output interventions that carry other hooks: on the bridge those
    hooks run in registration order with the interventions' own (a hook attached before `intervene` sees
    the z before the intervention); here the interventions run first, at the output projection's input."""
    structure = structure or _structure(model)
    layers = sorted({h.layer for i in interventions if i.kind in ON_Z for h in i.heads})
    allowed = handed_over_points(model)
    found = []
    for layer in layers:
        point = structure.hook_z[layer] if 0 <= layer < len(structure.hook_z) else None
        if point is not None and _n_hooks(point) > allowed.get(id(point), 0):
            found.append(f"blocks.{layer}.attn.hook_z")
    return found


def _swap_slots(model: LoadedModel) -> list[Slot] | None:
    """(HF parent, slot name, bridge attention, HF attention) for every layer; None where not one per layer."""
    return _structure(model).slots


def _scan_slots(model: LoadedModel) -> list[Slot] | None:
    bridges = {id(attn): attn for attn in _attention_bridges(model)}
    slots = [(parent, name, child, _original(child)) for parent in model.hf_model.modules()
             if not type(parent).__module__.startswith("transformer_lens")
             for name, child in parent._modules.items() if child is not None and id(child) in bridges]
    if len(slots) != len(bridges) or len(bridges) != model.n_layers:
        return None
    if any(original is None or getattr(original, "layer_idx", None) is None for *_, original in slots):
        return None
    return slots


def _configs(model: LoadedModel) -> list[Any]:
    return _structure(model).configs


def _scan_configs(model: LoadedModel) -> list[Any]:
    found = [model.hf_model.config] + [getattr(_original(a), "config", None) for a in _attention_bridges(model)]
    return list({id(c): c for c in found if c is not None}.values())
