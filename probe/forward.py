"""Partial forwards: the model's own decoder layers from layer k on, on a given residual stream.

Why: an ablated copy of a prompt equals the clean run below the ablated layer, so analyses that
ablate many heads one by one (Ships, Sahara) cache the clean residual stream once and rerun only the
layers from the ablated one up. TransformerLens 4's `start_at_layer` does not save that work (it
feeds the residual as `inputs_embeds`, runs every block and swaps the residual in at block k), so
`run_from_layer` calls the layers itself.

How it stays right on every family: each decoder layer needs, besides the hidden state, what the
family's decoder loop prepares for it (the causal mask, per layer for sliding-window layers; the
rotary cos/sin, per layer type on Gemma 3; position ids, cache positions; GPT-2's blocks take them
positionally). Rather than re-deriving that per family, `layer_calls` lets the model's own decoder
prepare it: it runs the decoder once on zero input embeddings with every layer replaced by a
recorder that keeps the layer's arguments and does no work, then puts the layers back. Learned
positions (GPT-2) and Gemma's embedding scale are added before layer 0, so a residual entering
layer k already holds them; parallel blocks (GPT-NeoX), post-norms (OLMo-2, Gemma) and MoE blocks
are inside the layers and need nothing here.

Hooks: the layers called are the bridge's block components (the bridge swapped them into the Hugging
Face module list), and the final norm is the module the full forward calls, so every hook of layers
`start..L-1` and of `ln_final` fires as in a full pass (interventions included); nothing before layer
`start` runs, and no hook fires while the arguments are recorded (the modules the decoder calls
before its loop, e.g. GPT-2's position embedding, have their hooks held back for that moment).

`model_final_states` reads one forward's final-norm states (the unembedding skipped on the fused path), for
read-outs of many interventions in one product (`probe.readout`). Which path a forward takes is
`probe.routing`'s decision.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from probe.architecture import architecture
from probe.errors import ProbeError
from probe.loaded import LoadedModel, Positions
from probe.routing import _pick_positions, forward_for_hooks, on_fused_path

__all__ = ["ForwardError", "forward_for_hooks", "layer_calls", "model_final_states", "on_fused_path",
           "run_from_layer"]


class ForwardError(ProbeError):
    """A partial forward that cannot run as asked (bad layer index, residual shape, layout)."""


class _Recorded(Exception):
    """Raised by the last recorder: the decoder's loop has prepared every layer's arguments."""


class _Recorder(nn.Module):
    """Stands in for one decoder layer: keeps the arguments the decoder passes, returns the hidden
    state unchanged. Other attribute reads (e.g. a layer's `attention_type`) go to the real layer."""

    def __init__(self, index: int, layer: nn.Module, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
                 last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: no parameters, no hooks
        self._index, self._calls, self._last = index, calls, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._calls[self._index] = (rest, dict(kwargs))
        if self._last:
            raise _Recorded
        return hidden


def _layer_list(model: LoadedModel) -> tuple[nn.ModuleList, nn.Module, str]:
    """The Hugging Face module list holding the decoder layers, its parent (the decoder), and its path."""
    arch = architecture(model)
    path = arch.path("attn", 0).rsplit(".", 1)[0]  # the block's own path, e.g. model.layers.0
    list_path, _, index = path.rpartition(".")
    if not index.isdigit() or not list_path:
        raise ForwardError(f"{arch.name}: decoder layer 0 sits at {path!r}, not in a numbered module list.")
    hf = model.hf_model
    layers = hf.get_submodule(list_path)
    decoder = hf.get_submodule(list_path.rpartition(".")[0]) if "." in list_path else hf
    if not isinstance(layers, nn.ModuleList) or len(layers) != arch.n_layers:
        raise ForwardError(f"{arch.name}: {list_path} is not a list of the {arch.n_layers} decoder layers.")
    for layer, (module, block) in enumerate(zip(layers, arch.blocks)):
        if module is not block:
            raise ForwardError(f"{arch.name}: {list_path}.{layer} is not the bridge's block {layer}; "
                               "a partial forward would bypass its hooks.")
    return layers, decoder, list_path


@contextlib.contextmanager
def _hooks_held_back(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Forward hooks of `modules` do not fire inside the block (they are put back afterwards)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in modules]
    try:
        for module, _, _ in saved:
            module._forward_hooks, module._forward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module._forward_hooks, module._forward_pre_hooks = hooks, pre_hooks


def layer_calls(model: LoadedModel, batch: int, length: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The arguments (besides the hidden state) the model's decoder passes to each of its layers for
    `batch` unpadded rows of `length` tokens at positions 0..length-1: `[(args, kwargs)] * n_layers`.

    The decoder runs on zero embeddings with its layers replaced by recorders (no layer computes
    anything); the layers are put back before this returns. Hold `model.lock` around it and the calls.
    """
    layers, decoder, list_path = _layer_list(model)
    arch = architecture(model)
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    originals = list(layers)
    inside = {id(m) for layer in originals for m in layer.modules()}
    outside = [m for m in model.hf_model.modules() if id(m) not in inside]
    weight = arch.final_norm.weight
    embeds = torch.zeros((batch, length, arch.d_model), dtype=model.dtype, device=weight.device)
    try:
        for index, layer in enumerate(originals):
            layers[index] = _Recorder(index, layer, calls, index == len(originals) - 1)
        with _hooks_held_back(outside), torch.no_grad():
            try:
                decoder(inputs_embeds=embeds, use_cache=False)
            except _Recorded:
                pass
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    if len(calls) != len(originals):
        raise ForwardError(f"{arch.name}: the decoder ({list_path}) called {len(calls)} of its "
                           f"{len(originals)} layers; a partial forward cannot be prepared.")
    return [calls[index] for index in range(len(originals))]


def run_from_layer(model: LoadedModel, resid: torch.Tensor, start: int) -> torch.Tensor:
    """Final-norm states `[B, T, d]` from the residual stream `resid` `[B, T, d]` entering layer `start`.

    Equals the full forward's `ln_final.hook_out` when `resid` is that forward's
    `blocks.{start}.hook_resid_pre` (unpadded rows, positions from 0). Hooks and interventions attached
    to the model fire in layers `start..L-1` and the final norm as in a full pass; holds `model.lock`.
    """
    if resid.dim() != 3 or resid.shape[-1] != model.d_model:
        raise ForwardError(f"The residual stream must be [batch, pos, {model.d_model}], got {list(resid.shape)}.")
    if not 0 <= start <= model.n_layers:
        raise ForwardError(f"Layer {start} does not exist; the model has layers 0..{model.n_layers - 1} "
                           f"(start = {model.n_layers} applies the final norm only).")
    arch = architecture(model)
    final_norm = model.hf_model.get_submodule(arch.path("ln_final"))
    with model.lock, on_fused_path(model):
        calls = layer_calls(model, resid.shape[0], resid.shape[1])
        hidden = resid
        for layer in range(start, model.n_layers):
            args, kwargs = calls[layer]
            out = arch.blocks[layer](hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return final_norm(hidden)


@torch.no_grad()
def model_final_states(model: LoadedModel, ids: torch.Tensor, positions: Positions = "last") -> torch.Tensor:
    """The final norm's output `[batch, n_positions, d_model]` of one forward (hooks and `intervene()` blocks
    in effect), read at `ln_final.hook_out`; on the fused path the unembedding never runs.

    Why: on a small model and short prompts the unembedding's weight (SmolLM2: 49,152 x 576, a fifth of
    the model) is read once per forward whatever the batch, so a caller comparing many interventions on
    the same prompts reads their states out in one product (`probe.readout.logits_from_normalized`, exact:
    the model's own unembedding, bias and soft-cap) instead of once per forward."""
    seen: dict[str, torch.Tensor] = {}

    def grab(normalized: torch.Tensor, hook: Any) -> torch.Tensor:
        seen.setdefault("out", normalized.detach())
        return normalized

    with model.hooks([("ln_final.hook_out", grab)]), forward_for_hooks(model) as run:
        run(ids if ids.dim() == 2 else ids[None])
    if "out" not in seen:
        raise ForwardError("The final norm's hook point (ln_final.hook_out) did not fire in the forward.")
    return _pick_positions(seen["out"], positions)
