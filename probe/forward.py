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

The plain-model helpers at the end (`final_states`, `output_logits`, `module_paths`) serve training on
a plain Hugging Face model (the refusal organism), where no bridge exists.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from probe.architecture import architecture
from probe.errors import ProbeError


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


def _layer_list(model: Any) -> tuple[nn.ModuleList, nn.Module, str]:
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


def layer_calls(model: Any, batch: int, length: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
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


def run_from_layer(model: Any, resid: torch.Tensor, start: int) -> torch.Tensor:
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


@contextlib.contextmanager
def on_fused_path(model: Any) -> Iterator[bool]:
    """For the block, the model's layers run on the fused path (`probe.fused`: the HF attention modules on
    SDPA, the open `intervene()` blocks handed over) where `model.fused_reason()` says that is exact, as
    `LoadedModel.logits` routes a full forward; else nothing changes (the bridge's eager attention, hooks
    live). Yields which. Hold `model.lock`; `run_from_layer` records the layer arguments (`layer_calls`) inside
    the block, so the masks are in the fused kernel's format."""
    reason = model.fused_reason() if hasattr(model, "fused_reason") else "not a LoadedModel"
    if reason is not None:
        yield False
        return
    from probe.fused import FusedPathError, fused

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(model._handed_over())
            stack.enter_context(fused(model, model._open_interventions()))
        except FusedPathError:  # a mismatch found on entry (everything restored): the bridge
            stack.close()
            yield False
            return
        yield True


@contextlib.contextmanager
def forward_for_hooks(model: Any) -> Iterator[Callable[[torch.Tensor], bool]]:
    """For the block, `run(ids)` is one whole forward whose point is what the attached hooks capture or
    change (no logits wanted), with autograd where it is enabled: on the fused path where
    `model.fused_reason()` says that is exact (the open `intervene()` blocks handed over, no logit computed:
    unembedding hooks see an empty position axis), else through the bridge. `run` returns whether it ran
    fused. Why a block and not a call: a backward through layers recomputed in the backward
    (`model.recompute_layers_in_backward`) must find the same path in place, so call `backward()` inside it. Holds `model.lock`."""
    with model.lock, on_fused_path(model) as fused_ok:
        def run(ids: torch.Tensor) -> bool:
            if fused_ok:  # an empty `logits_to_keep`: the unembedding multiplies no row
                model.hf_model(ids, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
            else:
                model.bridge(ids, use_cache=False)
            return fused_ok

        yield run


@torch.no_grad()
def final_normalized(model: Any, ids: torch.Tensor, positions: str | slice | Sequence[int] | None = "last") -> torch.Tensor:
    """The final norm's output `[batch, n_positions, d_model]` of one forward (hooks and `intervene()` blocks
    in effect), read at `ln_final.hook_out`; on the fused path the unembedding never runs.

    Why: on a small model and short prompts the unembedding's weight (SmolLM2: 49,152 x 576, a fifth of
    the model) is read once per forward whatever the batch, so a caller comparing many interventions on
    the same prompts reads their states out in one product (`probe.readout.logits_from_normalized`, exact:
    the model's own unembedding, bias and soft-cap) instead of once per forward."""
    from probe.models import _pick_positions

    seen: dict[str, torch.Tensor] = {}

    def grab(normalized: torch.Tensor, hook: Any) -> torch.Tensor:
        seen.setdefault("out", normalized.detach())
        return normalized

    with model.hooks([("ln_final.hook_out", grab)]), forward_for_hooks(model) as run:
        run(ids if ids.dim() == 2 else ids[None])
    if "out" not in seen:
        raise ForwardError("The final norm's hook point (ln_final.hook_out) did not fire in the forward.")
    return _pick_positions(seen["out"], positions)


# ==== plain Hugging Face models (training, where no bridge exists) ===================================

def final_states(hf_model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states `[B, T, d]` of a plain Hugging Face causal LM (no unembedding)."""
    return hf_model.get_decoder()(input_ids=ids, attention_mask=attention_mask).last_hidden_state


def output_logits(hf_model: Any, states: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of final-norm states `[..., d]` of a plain Hugging Face causal LM: its output
    embedding (with its bias) and the family's final logit soft-cap (Gemma 2), as its forward does."""
    logits = hf_model.get_output_embeddings()(states).float()
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    if cap is None and hasattr(hf_model.config, "get_text_config"):
        cap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# Per-layer components `module_paths` resolves, as architecture-layer paths. q/k/v fall back to the
# fused projection where the family has one (GPT-2 `c_attn`, GPT-NeoX, Phi-3): the bridge's split q/k/v
# modules exist only in a bridged model, so training "q" there trains the fused q/k/v tensor.
COMPONENTS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "qkv": "attn.qkv", "o": "attn.o", "attn": "attn",
              "mlp": "mlp", "ln1": "ln1", "ln2": "ln2", "ln1_post": "ln1_post", "ln2_post": "ln2_post"}


def module_paths(hf_model: Any, components: Sequence[str], layers: Sequence[int],
                 tokenizer: Any = None) -> dict[tuple[str, int], str]:
    """Hugging Face module paths of per-layer components (`COMPONENTS`: q, k, v, o, qkv, attn, mlp, norms)
    in a plain model, `{(component, layer): path}`, read through the architecture layer.

    The bridge rewires the model it wraps, so the paths are read from a bridged deep copy (discarded);
    the model itself stays plain. `tokenizer` is only needed to boot the bridge (default: probe's word
    tokenizer). A component the family lacks raises `MissingComponentError` naming it.
    """
    from probe.architecture import MissingComponentError
    from probe.models import wrap_hf_model

    if tokenizer is None:
        from probe.tiny import word_tokenizer

        tokenizer = word_tokenizer(name="probe/paths")
    device = next(hf_model.parameters()).device
    twin = wrap_hf_model(copy.deepcopy(hf_model), tokenizer, "module-paths", hub_name="probe/module-paths",
                         device=str(device), dtype=_dtype_name(next(hf_model.parameters()).dtype))
    arch = architecture(twin)
    bad = [layer for layer in layers if not 0 <= layer < arch.n_layers]
    if bad:
        raise ForwardError(f"Layers {bad} do not exist; the model has {arch.n_layers} layers.")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ForwardError(f"Unknown components {unknown}; choose from {', '.join(COMPONENTS)}.")
    plain = dict(hf_model.named_modules())
    paths: dict[tuple[str, int], str] = {}
    for layer in layers:
        for component in components:
            path = arch.path(COMPONENTS[component], layer)
            if path not in plain and component in ("q", "k", "v"):
                path = arch.path("attn.qkv", layer)  # a fused projection (only the bridge splits it)
            if path not in plain:
                raise MissingComponentError(arch.name, f"blocks.{layer}.{COMPONENTS[component]} as a module of "
                                                       "the plain model")
            paths[(component, layer)] = path
    return paths


def _dtype_name(dtype: torch.dtype) -> str:
    from probe.models import DTYPES

    return next((name for name, value in DTYPES.items() if value == dtype), "float32")
