"""Reading the residual stream out as logits: the ONE final-norm read-out, through the architecture layer.

Two uses, two functions:

- the exact read-out of a final residual: `apply_final_norm` (the family's own final norm module) then
  `logits_from_normalized` (unembedding, its bias, the family's final logit soft-cap): together they
  are the model's logits, on every family;
- direct logit attribution needs the final norm as a *linear* map: its scale is taken from the clean
  run and held fixed, so contributions add up (`frozen_final_norm`, `direction_logits`). RMSNorm:
  x/s·g; LayerNorm: (x − mean x)/s·g (its bias belongs to no component); Gemma's RMSNorm multiplies
  by (1 + w), which `architecture(model).final_norm.weight` already holds. No unembedding bias and
  no soft-cap here either: neither is linear in a contribution.

Everything is read through `probe.architecture`; the full-vocabulary unembedding is used as stored
(no float copy) unless `ids` restricts a read-out to a few tokens. Logits and log-probabilities come out
in float32 whatever the model's dtype (softmax and KL are not run in bf16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from probe.architecture import architecture
from probe.loaded import LoadedModel


def final_norm_weight(model: LoadedModel) -> torch.Tensor:
    """The effective elementwise gain of the final norm (Gemma: 1 + w)."""
    return architecture(model).final_norm.weight


def is_layer_norm(model: LoadedModel) -> bool:
    """Whether the final norm centres its input (LayerNorm) rather than only rescaling it (RMSNorm)."""
    return architecture(model).final_norm.kind == "layer"


def final_scale(model: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """The final norm's scale `[..., 1]` of a residual `[..., d_model]` (RMS, or standard deviation for
    LayerNorm, with the norm's own eps): the clean scale to freeze for `direction_logits`."""
    norm = architecture(model).final_norm
    x = resid.float()
    if norm.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()


def frozen_final_norm(model: LoadedModel, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply the final norm to `x` (`[..., d_model]`) with the given frozen `scale` (`[..., 1]`), no bias."""
    if is_layer_norm(model):
        x = x - x.mean(-1, keepdim=True)
    return x / scale * final_norm_weight(model)


def unembed(model: LoadedModel, normalized: torch.Tensor) -> torch.Tensor:
    """Logits (float32) from normalised residual directions, full vocabulary (no unembedding bias: it
    belongs to no component; no soft-cap: it is not linear). The product runs in the model's dtype, as
    the model's own unembedding does; the result is float32, so a softmax over it is (bf16 models)."""
    weight = architecture(model).unembed_weight
    return torch.nn.functional.linear(normalized.to(weight.device, weight.dtype), weight).float()


def direction_logits(model: LoadedModel, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a residual-stream contribution `x` adds to the logits, final-norm scale frozen."""
    return unembed(model, frozen_final_norm(model, x, scale))


def apply_final_norm(model: LoadedModel, resid: torch.Tensor) -> torch.Tensor:
    """The final residual `[..., d_model]` through the family's own final norm module (exact)."""
    norm = architecture(model).final_norm
    return norm(resid.to(norm.weight.dtype))


def logits_from_normalized(model: LoadedModel, normalized: torch.Tensor, ids: Sequence[int] | None = None) -> torch.Tensor:
    """The model's logits (float32) from final-norm states `[..., d_model]`: unembedding, its bias, and the
    family's final logit soft-cap (Gemma 2). `ids` restricts the read-out to those tokens (`[..., n]`),
    reading only their unembedding columns."""
    arch = architecture(model)
    bias = arch.b_U
    if ids is None:
        logits = unembed(model, normalized).float()
    else:
        ids = [int(i) for i in ids]
        logits = normalized.float() @ arch.W_U_columns(ids)
        bias = None if bias is None else bias[torch.as_tensor(ids, device=bias.device)]
    if bias is not None:
        logits = logits + bias
    cap = arch.softcap_logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def log_probs_from_normalized(model: LoadedModel, normalized: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the full vocabulary (float32) from final-norm states."""
    return torch.log_softmax(logits_from_normalized(model, normalized), dim=-1)
