"""Facts the architecture layer (`probe.architecture`) does not expose yet, read from an `Architecture`.

CD-T re-runs a model as two streams and so needs every weight and table of the forward pass as a
value, not only as a callable: the MLP projections (gated, plain, and each expert of an MoE block
with its router), the rotary cos/sin tables the model itself uses (per layer type, partial rotary
included), the learned positional embedding, and the attention variants it cannot decompose. Each
function takes the `Architecture` and reads through the bridge's components (`mlp.in / gate / out`,
`pos_embed`) and the Hugging Face modules under them; the Hugging Face attribute names live here,
not in the analyses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from probe.architecture import Architecture, MissingComponentError, hf_module
from probe.models import resident

Tensor = torch.Tensor


@dataclass(frozen=True)
class MlpWeights:
    """A dense MLP as `[d_in, d_out]` weights (views of the model's own tensors, model dtype):
    `out = act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out` when gated, else
    `act(x W_in + b_in) W_out + b_out`."""

    W_in: Tensor
    b_in: Tensor | None
    W_gate: Tensor | None
    b_gate: Tensor | None
    W_out: Tensor
    b_out: Tensor | None
    act: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MoeWeights:
    """A sparse MoE block: `route(x [N, d]) -> (weights [N, k], experts [N, k])` is the model's own
    router (softmax, top-k and, where the family does it, renormalisation of the top-k weights), and
    each expert is a gated MLP `act(x W_gate[e]) * (x W_up[e])) W_down[e]` (`[E, d, f]`, `[E, f, d]`)."""

    route: Callable[[Tensor], tuple[Tensor, Tensor]]
    W_gate: Tensor
    W_up: Tensor
    W_down: Tensor
    act: Callable[[Tensor], Tensor]
    n_experts: int
    top_k: int
    renormalised: bool  # the top-k weights are divided by their sum (Mixtral always; Qwen3-MoE: norm_topk_prob)


def _as_in_out(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight `[d_in, d_out]`, bias) of a Linear (stores `[out, in]`) or GPT-2's Conv1D (stores `[in, out]`)."""
    weight = resident(module, "weight")  # offloaded weights (accelerate) are read one module at a time
    bias = resident(module, "bias")
    if isinstance(module, nn.Linear):
        return weight.T, bias
    if type(module).__name__ == "Conv1D":
        return weight, bias
    raise MissingComponentError("model", f"linear projection ({type(module).__name__})", "neither Linear nor Conv1D")


def activation(arch: Architecture, layer: int) -> Callable[[Tensor], Tensor]:
    """The MLP's own activation module (act_fn / act / activation_fn), else the config's named one."""
    module = arch.mlp(layer).module
    for name in ("act_fn", "act", "activation_fn"):
        act = getattr(module, name, None)
        if act is not None:
            return hf_module(act)
    experts = getattr(module, "experts", None)
    if experts is not None and getattr(experts, "act_fn", None) is not None:
        return experts.act_fn
    from transformers.activations import ACT2FN

    if arch.mlp(layer).act in ACT2FN:
        return ACT2FN[arch.mlp(layer).act]
    raise MissingComponentError(arch.name, f"blocks.{layer}.mlp activation", f"unknown {arch.mlp(layer).act!r}")


def mlp_weights(arch: Architecture, layer: int) -> MlpWeights:
    """The dense MLP of `layer` through the bridge's `mlp.in` / `mlp.gate` / `mlp.out` linear components
    (the bridge splits Phi-3's fused gate_up projection into `gate` and `in`)."""
    block = arch.blocks[layer]
    parts = block.mlp._modules
    if arch.mlp(layer).kind == "moe" or "in" not in parts or "out" not in parts:
        raise MissingComponentError(arch.name, f"blocks.{layer}.mlp in/out projections")
    W_in, b_in = _as_in_out(hf_module(parts["in"]))
    W_out, b_out = _as_in_out(hf_module(parts["out"]))
    W_gate = b_gate = None
    if arch.mlp(layer).kind == "gated":
        if "gate" not in parts:
            raise MissingComponentError(arch.name, f"blocks.{layer}.mlp.gate projection")
        W_gate, b_gate = _as_in_out(hf_module(parts["gate"]))
    return MlpWeights(W_in, b_in, W_gate, b_gate, W_out, b_out, activation(arch, layer))


def moe_weights(arch: Architecture, layer: int) -> MoeWeights:
    """The MoE block of `layer`: its router (the bridge's `mlp.gate`, run as the Hugging Face module) and
    the experts' stacked weights. Only the stacked-tensor expert layout (transformers >= 5) and blocks
    without a shared expert are read; anything else is a `MissingComponentError` naming it."""
    spec = arch.mlp(layer)
    module = spec.module
    if spec.kind != "moe":
        raise MissingComponentError(arch.name, f"blocks.{layer}.mlp MoE block")
    if any(getattr(module, name, None) is not None for name in ("shared_expert", "shared_experts")):
        raise MissingComponentError(arch.name, f"blocks.{layer}.mlp without a shared expert",
                                    "shared experts have no CD-T reading yet")
    parts = arch.blocks[layer].mlp._modules
    router = hf_module(parts["gate"]) if "gate" in parts else None
    experts = getattr(module, "experts", None)
    gate_up = resident(experts, "gate_up_proj") if experts is not None else None
    down = resident(experts, "down_proj") if experts is not None else None
    if router is None or not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise MissingComponentError(arch.name, f"blocks.{layer}.mlp router and stacked expert weights")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise MissingComponentError(arch.name, f"blocks.{layer}.mlp bias-free experts")
    f = gate_up.shape[1] // 2
    gate_up = gate_up.detach()
    # HF: gate, up = (x @ gate_up_proj[e].T).chunk(2): the first f rows are the gate, the next f the up
    W_gate, W_up = gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2)   # [E, d, f]
    W_down = down.detach().transpose(1, 2)                                           # [E, f, d]
    top_k = int(getattr(router, "top_k", spec.top_k or 0))
    renormalised = bool(getattr(router, "norm_topk_prob", True))  # Mixtral's router always renormalises

    def route(x: Tensor) -> tuple[Tensor, Tensor]:
        weight = router.weight
        with torch.no_grad():
            out = router(x.to(weight.dtype))
        if not (isinstance(out, tuple) and len(out) == 3):
            raise MissingComponentError(arch.name, f"blocks.{layer}.mlp router returning (logits, weights, experts)")
        return out[1], out[2]

    return MoeWeights(route, W_gate, W_up, W_down, activation(arch, layer), int(gate_up.shape[0]), top_k,
                      renormalised)


# ---- rotary tables ------------------------------------------------------------------------------

def _rotary_module(arch: Architecture) -> nn.Module:
    cached = arch.model.extra.get("_rotary_module")
    if cached is None:
        found = [m for m in arch.model.hf_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if not found:
            raise MissingComponentError(arch.name, "rotary embedding module")
        cached = found[0]
        arch.model.extra["_rotary_module"] = cached
    return cached


def rotary_key(arch: Architecture, layer: int) -> str | None:
    """Which rotary table a layer uses (its layer type where the family has several, e.g. Gemma 3's
    local/global bases), None without rotary."""
    if arch.rotary(layer) is None:
        return None
    return getattr(hf_module(arch.blocks[layer].attn), "layer_type", None) or "default"


def rotary_tables(arch: Architecture, key: str, length: int) -> tuple[Tensor, Tensor]:
    """cos, sin `[length, rotary_dims]` exactly as the model's rotary module returns them (scaling,
    attention factor and partial rotary included), float32."""
    module = _rotary_module(arch)
    positions = torch.arange(length, device=torch.device(arch.model.device))[None]
    probe_x = torch.zeros(1, dtype=torch.float32, device=positions.device)
    takes_type = "layer_type" in inspect.signature(module.forward).parameters
    with torch.no_grad():
        cos, sin = module(probe_x, positions, key) if takes_type else module(probe_x, positions)
    return cos[0].float(), sin[0].float()


def learned_positions(arch: Architecture) -> Tensor | None:
    """The learned positional embedding `[n_ctx, d_model]` (GPT-2), None for rotary families."""
    if not arch.has_learned_positions:
        return None
    return resident(hf_module(arch.model.bridge.pos_embed), "weight")


@torch.no_grad()
def set_learned_positions(arch: Architecture, W_pos: Tensor) -> None:
    """Write the learned positional embedding `[n_ctx, d_model]` (GPT-2; the planted CD-T model):
    `probe.plant` has no position writer yet. Drops the cached architecture (its tables are stale)."""
    weight = learned_positions(arch)
    if weight is None:
        raise MissingComponentError(arch.name, "learned positional embedding")
    if tuple(W_pos.shape) != tuple(weight.shape):
        raise MissingComponentError(arch.name, f"positional embedding of shape {list(W_pos.shape)}",
                                    f"it is {list(weight.shape)}")
    hf_module(arch.model.bridge.pos_embed).weight.copy_(W_pos.to(weight.dtype))
    arch.model.extra.pop("_architecture", None)


def unsupported_attention(arch: Architecture) -> str | None:
    """An attention variant that the stacked weights and `Attention` facts do not describe (CD-T would
    compute the wrong scores), named; None when there is none."""
    config = arch.hf_config
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(config, flag, False):
            return f"attention with {flag}"
    if getattr(config, "alibi", False) or arch.positional == "alibi":
        return "ALiBi positions"
    return None
