"""The architecture layer's values: norms, rotary, attention facts, the MLP block, and the errors.

Each value is read from one layer of a bridged model by `probe.architecture.reader.Architecture`;
`Norm` and `Mlp` call the Hugging Face module itself, so applying them is exact. `Mlp` also gives its
weights as tensors (`dense_weights`, `moe_weights`), for analyses that re-run the block as values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from probe.errors import ProbeError
from probe.placement import resident

Tensor = torch.Tensor

BLOCK_NORMS = ("ln1", "ln2", "ln1_post", "ln2_post")  # pre-attention, pre-MLP, post-attention, post-MLP
ATTN_NORMS = ("q_norm", "k_norm")


class ArchitectureError(ProbeError):
    """A model whose layout the architecture layer cannot read."""


class MissingComponentError(ArchitectureError):
    """The model has no such component (e.g. no attention in a state-space model, no MLP weights)."""

    def __init__(self, model_name: str, component: str, why: str = "") -> None:
        self.component = component
        super().__init__(f"{model_name}: the architecture layer found no {component}"
                         + (f" ({why})" if why else "")
                         + "; this analysis needs it. Families covered: see docs/ARCHITECTURES.md.")


def hf_module(component: Any) -> Any:
    """The Hugging Face module under a bridge component (the bridge swaps them in place)."""
    while True:
        inner = component.__dict__.get("_modules", {}).get("_original_component")
        if inner is None:
            inner = getattr(component, "original_component", None)
        if inner is None or inner is component:
            return component
        component = inner


@dataclass(frozen=True)
class Norm:
    """One normalisation: `kind` 'rms' or 'layer'; `weight` the effective multiplier (`1 + w` for
    Gemma, whose stored weight is w: `offset` 1); `bias` (LayerNorm); `eps`; `path` in the HF model.
    Calling it applies the Hugging Face module itself (exact, dtype handling included)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    offset: float
    path: str
    module: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @property
    def size(self) -> int:
        return int(self.weight.shape[-1])


@dataclass(frozen=True)
class Rotary:
    """Rotary positions: `dims` of each head's d_head rotated (partial rotary: fewer), base `theta`."""

    dims: int
    theta: float | None


@dataclass(frozen=True)
class Attention:
    """What a layer's attention does between q.k and the softmax, and where its modules are."""

    scaling: float
    softcap: float | None
    window: int | None  # key k visible from query q iff q - k < window
    o_path: str         # the output projection (its input is z, heads concatenated)
    qkv_packed: bool    # q, k and v in one projection matrix (GPT-2, GPT-NeoX, Phi-3); summary key "qkv_fused"


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


class Mlp:
    """A layer's MLP (or MoE block) as a function of the residual-stream input `[..., d_model]`."""

    def __init__(self, kind: str, module: nn.Module, path: str, act: str | None, n_experts: int | None,
                 top_k: int | None, component: nn.Module, owner: str, layer: int) -> None:
        self.kind, self.module, self.path, self.act = kind, module, path, act
        self.n_experts, self.top_k = n_experts, top_k
        # the bridge's MLP component (its `in` / `gate` / `out` parts), the model's name and the layer, for errors
        self.component, self.owner, self.layer = component, owner, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.module(x.reshape(1, -1, shape[-1]))  # MoE blocks unpack (batch, pos, d)
        if isinstance(out, tuple):  # (hidden, router_logits) on some MoE families
            out = out[0]
        return out.reshape(shape)

    def __repr__(self) -> str:
        experts = f", {self.n_experts} experts top-{self.top_k}" if self.kind == "moe" else ""
        return f"Mlp({self.kind}, act={self.act}{experts}, {self.path})"

    # ---- the block as tensors ---------------------------------------------------------------------
    def activation(self) -> Callable[[Tensor], Tensor]:
        """The MLP's own activation module (act_fn / act / activation_fn), else the config's named one."""
        module = self.module
        for name in ("act_fn", "act", "activation_fn"):
            act = getattr(module, name, None)
            if act is not None:
                return hf_module(act)
        experts = getattr(module, "experts", None)
        if experts is not None and getattr(experts, "act_fn", None) is not None:
            return experts.act_fn
        from transformers.activations import ACT2FN

        if self.act in ACT2FN:
            return ACT2FN[self.act]
        raise MissingComponentError(self.owner, f"blocks.{self.layer}.mlp activation", f"unknown {self.act!r}")

    def dense_weights(self) -> MlpWeights:
        """The dense MLP through the bridge's `mlp.in` / `mlp.gate` / `mlp.out` linear components (the bridge
        splits Phi-3's packed gate_up projection into `gate` and `in`)."""
        parts = self.component._modules
        if self.kind == "moe" or "in" not in parts or "out" not in parts:
            raise MissingComponentError(self.owner, f"blocks.{self.layer}.mlp in/out projections")
        W_in, b_in = _as_in_out(hf_module(parts["in"]))
        W_out, b_out = _as_in_out(hf_module(parts["out"]))
        W_gate = b_gate = None
        if self.kind == "gated":
            if "gate" not in parts:
                raise MissingComponentError(self.owner, f"blocks.{self.layer}.mlp.gate projection")
            W_gate, b_gate = _as_in_out(hf_module(parts["gate"]))
        return MlpWeights(W_in, b_in, W_gate, b_gate, W_out, b_out, self.activation())

    def moe_weights(self) -> MoeWeights:
        """The MoE block: its router (the bridge's `mlp.gate`, run as the Hugging Face module) and the
        experts' stacked weights. Only the stacked-tensor expert layout (transformers >= 5) and blocks
        without a shared expert are read; anything else is a `MissingComponentError` naming it."""
        module = self.module
        layer = self.layer
        if self.kind != "moe":
            raise MissingComponentError(self.owner, f"blocks.{layer}.mlp MoE block")
        if any(getattr(module, name, None) is not None for name in ("shared_expert", "shared_experts")):
            raise MissingComponentError(self.owner, f"blocks.{layer}.mlp without a shared expert",
                                        "shared experts have no CD-T reading yet")
        parts = self.component._modules
        router = hf_module(parts["gate"]) if "gate" in parts else None
        experts = getattr(module, "experts", None)
        gate_up = resident(experts, "gate_up_proj") if experts is not None else None
        down = resident(experts, "down_proj") if experts is not None else None
        if router is None or not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
            raise MissingComponentError(self.owner, f"blocks.{layer}.mlp router and stacked expert weights")
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise MissingComponentError(self.owner, f"blocks.{layer}.mlp bias-free experts")
        f = gate_up.shape[1] // 2
        gate_up = gate_up.detach()
        # HF: gate, up = (x @ gate_up_proj[e].T).chunk(2): the first f rows are the gate, the next f the up
        W_gate, W_up = gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2)   # [E, d, f]
        W_down = down.detach().transpose(1, 2)                                           # [E, f, d]
        top_k = int(getattr(router, "top_k", self.top_k or 0))
        renormalised = bool(getattr(router, "norm_topk_prob", True))  # Mixtral's router always renormalises
        owner = self.owner

        def route(x: Tensor) -> tuple[Tensor, Tensor]:
            weight = router.weight
            with torch.no_grad():
                out = router(x.to(weight.dtype))
            if not (isinstance(out, tuple) and len(out) == 3):
                raise MissingComponentError(owner, f"blocks.{layer}.mlp router returning (logits, weights, experts)")
            return out[1], out[2]

        return MoeWeights(route, W_gate, W_up, W_down, self.activation(), int(gate_up.shape[0]), top_k,
                          renormalised)


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), name, None)
    return value


def _read_norm(module: nn.Module, path: str) -> Norm:
    """Kind, eps, effective weight and offset of a norm module, checked against the module's output."""
    weight = resident(module, "weight")
    bias = resident(module, "bias")
    if isinstance(module, nn.LayerNorm) or (bias is not None and isinstance(bias, torch.Tensor)):
        eps = float(getattr(module, "eps", 1e-5))
        return Norm("layer", weight.detach(), None if bias is None else bias.detach(), eps, 0.0, path, module)
    if weight is None:
        raise ArchitectureError(f"{path}: a norm without a weight ({type(module).__name__}) is not supported.")
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    # A row of ones has mean square 1: the module returns weight_eff / sqrt(1 + eps).
    ones = torch.ones(1, weight.shape[-1], dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        effective = (module(ones.to(weight.dtype)).float() * math.sqrt(1.0 + eps))[0]
    stored = weight.detach().float()
    # The two parametrisations differ by exactly 1 on every entry: pick the closer one, and accept it
    # when its error is within the module dtype's rounding (bf16: ~0.4%) of the weight's scale.
    errors = {candidate: float((effective - stored - candidate).abs().max()) for candidate in (0.0, 1.0)}
    offset = min(errors, key=errors.get)
    tolerance = (1e-3 + 4 * torch.finfo(weight.dtype).eps) * max(1.0, float(effective.abs().max()))
    if errors[offset] > tolerance:
        raise ArchitectureError(f"{path} ({type(module).__name__}) is not a diagonal RMS norm with weight w or 1 + w.")
    return Norm("rms", (stored + offset).to(weight.dtype), None, eps, offset, path, module)
