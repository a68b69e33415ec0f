"""Reading residual-stream directions out as logits: the final norm with its scale frozen, then W_U.

Direct logit attribution needs the final norm as a *linear* map: the norm's scale is taken from the
clean run (`ln_final.hook_scale`) and held fixed, so contributions add up. RMSNorm: x/s·g;
LayerNorm: (x − mean x)/s·g (its bias belongs to no head); Gemma's RMSNorm multiplies by (1 + g).
"""

from __future__ import annotations

from typing import Any

import torch


def final_norm_weight(model: Any) -> torch.Tensor:
    """The effective elementwise gain of the final norm."""
    module = model.bridge.ln_final.original_component
    weight = module.weight.detach()
    return 1.0 + weight if "Gemma" in type(module).__name__ else weight


def is_layer_norm(model: Any) -> bool:
    return isinstance(model.bridge.ln_final.original_component, torch.nn.LayerNorm)


def frozen_final_norm(model: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply the final norm to `x` (`[..., d_model]`) with the given frozen `scale` (`[..., 1]`), no bias."""
    if is_layer_norm(model):
        x = x - x.mean(-1, keepdim=True)
    return x / scale * final_norm_weight(model)


def unembed(model: Any, normalized: torch.Tensor) -> torch.Tensor:
    """Logits from normalised residual directions (no unembedding bias: it belongs to no component)."""
    return normalized @ model.bridge.W_U


def direction_logits(model: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a residual-stream contribution `x` adds to the logits, final-norm scale frozen."""
    return unembed(model, frozen_final_norm(model, x, scale))
