"""The fused-attention layer's unhooked prefill: a forward on the HF attention modules with nothing attached.

`native_attention(model)` serves a forward that needs no attention hooks, interventions or kernel
observers at all, on either route (retrieval's detection prefill, whose decode then runs fused with
observers or on the bridge with pattern hooks): the bridge's attention components leave the HF
decoder layers' slots and the config asks for SDPA, so no layer materialises its `[H, N, N]` scores.
Unlike `probe.fused.fused` it installs nothing (no kernel wrapper, no head-output hooks), and where a
hook someone attached would be skipped it changes nothing and the bridge runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from probe.loaded import LoadedModel


@contextlib.contextmanager
def native_attention(model: LoadedModel, implementation: str = "sdpa") -> Iterator[bool]:
    """For forwards that need no attention hooks: each decoder layer calls the HF attention module the
    bridge wraps, with `implementation` (SDPA), instead of the bridge's eager re-implementation, which
    materialises every layer's `[H, N, N]` scores (quadratic time and memory at long prompts).

    Swaps the bridge's attention modules out of their parent layers and sets the config's attention
    implementation, under `model.lock`, and restores both on exit (also on error), so other users of the
    bridge never see the change. Yields False and changes nothing where the swap is not well defined
    (a model without SDPA support, an attention module without `layer_idx`, output_attentions on) or
    would skip someone's hooks (a hook on any HookPoint of the bridge's attention, e.g. an intervention)."""
    from transformer_lens.hook_points import HookPoint

    with model.lock:
        hf_model = model.hf_model
        bridges = {id(block.attn): block.attn for block in model.bridge.blocks}
        originals = {key: getattr(attn, "original_component", None) for key, attn in bridges.items()}
        # the HF layers' own slots (the bridge's blocks also list the attention as a child, unused on forward)
        slots = [(parent, name, child) for parent in hf_model.modules()
                 if not type(parent).__module__.startswith("transformer_lens")
                 for name, child in parent._modules.items() if child is not None and id(child) in bridges]
        configs = {id(config): config for config in
                   [hf_model.config] + [getattr(o, "config", None) for o in originals.values()] if config is not None}
        possible = (bool(getattr(hf_model, "_supports_sdpa", False))
                    and len(slots) == len(bridges) == model.n_layers
                    and all(o is not None and getattr(o, "layer_idx", None) is not None for o in originals.values())
                    and not any(getattr(config, "output_attentions", False) for config in configs.values())
                    # hooks someone attached (interventions) must keep firing: then the bridge's attention runs
                    and not any(isinstance(module, HookPoint) and (module._forward_hooks or module._forward_pre_hooks)
                                for attn in bridges.values() for module in attn.modules()))
        if not possible:
            yield False
            return
        previous = {key: config._attn_implementation_internal for key, config in configs.items()}
        try:
            for config in configs.values():
                config._attn_implementation_internal = implementation
            for parent, name, child in slots:
                parent._modules[name] = originals[id(child)]
            yield True
        finally:
            for parent, name, child in slots:
                parent._modules[name] = child
            for key, config in configs.items():
                config._attn_implementation_internal = previous[key]


__all__ = ["native_attention"]
