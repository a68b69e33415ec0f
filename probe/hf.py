"""Hugging Face models into probe and out of it.

`wrap_hf_model` boots a TransformerBridge around an already-built Hugging Face model (loaded, tiny or
planted) and reads the facts a `LoadedModel` carries; importing it installs the routes every model
takes (`probe.routing`: fused path or bridge). The helpers below it serve training on a plain Hugging Face
model (the refusal organism), where no bridge exists: `hf_final_states`, `output_logits`, `module_paths`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from probe import routed_decode, routing
from probe.architecture import MissingComponentError, architecture
from probe.errors import UnknownModelError
from probe.forward import ForwardError
from probe.loaded import LoadedModel, Routes, _fingerprint, install_routes
from probe.placement import DTYPES, _check_not_mixed, _check_placed_dtype, _dtype_name, _input_device, default_device
from probe.tiny import word_tokenizer

# What every model asks when it runs: the route decision and the routed forwards.
ROUTES = Routes(fused_reason=routing.fused_reason, logits=routing.logits, generate=routed_decode.generate)
install_routes(ROUTES)


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the libraries' load-time chatter (progress bars, deprecation warnings)."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("transformers").setLevel(level)
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def wrap_hf_model(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str,
                  hub_name: str = "", device: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Boot a TransformerBridge around an already-built Hugging Face model (tiny or planted models too)."""
    from transformer_lens.model_bridge import TransformerBridge

    torch_dtype = DTYPES[dtype]
    placed = getattr(hf_model, "hf_device_map", None)
    if placed:  # dispatched by accelerate: its hooks move weights and activations; never `.to()` it
        _check_not_mixed(placed.values(), spec)
        _check_placed_dtype(hf_model, torch_dtype, spec)
        device = str(_input_device(hf_model))
        hf_model = hf_model.eval()
    else:
        device = device or default_device()
        hf_model = hf_model.to(device=device, dtype=torch_dtype).eval()
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]  # GGUF loads leave it empty
    with _quiet():
        try:
            bridge = TransformerBridge.boot_transformers(hub_name or spec, hf_model=hf_model, tokenizer=tokenizer,
                                                         device=None if placed else device)
        except (ValueError, NotImplementedError, KeyError) as error:
            raise UnknownModelError(
                f"TransformerLens cannot bridge {spec} ({hf_model.config.architectures[0]}): {error}"
            ) from error
    cfg = bridge.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    n_ctx = int(getattr(hf_model.config, "max_position_embeddings", None)
                or getattr(hf_model.config, "n_positions", None) or cfg.n_ctx)
    for param in hf_model.parameters():
        param.requires_grad_(False)
    model = LoadedModel(
        spec=spec, bridge=bridge, hf_model=hf_model, tokenizer=tokenizer, device=device,
        dtype=torch_dtype, n_layers=int(cfg.n_layers), n_heads=n_heads, n_kv_heads=n_kv,
        d_head=int(cfg.d_head), d_model=int(cfg.d_model), d_vocab=int(cfg.d_vocab), n_ctx=n_ctx,
        architecture=hf_model.config.architectures[0], fingerprint=_fingerprint(spec, hf_model, torch_dtype),
    )
    model.memo["hub_name"] = hub_name or spec
    return model


# ==== plain Hugging Face models (training, where no bridge exists) ===================================

def hf_final_states(hf_model: PreTrainedModel, ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states `[B, T, d]` of a plain Hugging Face causal LM (no unembedding)."""
    return hf_model.get_decoder()(input_ids=ids, attention_mask=attention_mask).last_hidden_state


def output_logits(hf_model: PreTrainedModel, states: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of final-norm states `[..., d]` of a plain Hugging Face causal LM: its output
    embedding (with its bias) and the family's final logit soft-cap (Gemma 2), as its forward does."""
    logits = hf_model.get_output_embeddings()(states).float()
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    if cap is None and hasattr(hf_model.config, "get_text_config"):
        cap = getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# Per-layer components `module_paths` resolves, as architecture-layer paths. q/k/v fall back to the
# packed projection where the family has one (GPT-2 `c_attn`, GPT-NeoX, Phi-3): the bridge's split q/k/v
# modules exist only in a bridged model, so training "q" there trains the packed q/k/v tensor.
COMPONENTS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "qkv": "attn.qkv", "o": "attn.o", "attn": "attn",
              "mlp": "mlp", "ln1": "ln1", "ln2": "ln2", "ln1_post": "ln1_post", "ln2_post": "ln2_post"}


def module_paths(hf_model: PreTrainedModel, components: Sequence[str], layers: Sequence[int],
                 tokenizer: Any = None) -> dict[tuple[str, int], str]:
    """Hugging Face module paths of per-layer components (`COMPONENTS`: q, k, v, o, qkv, attn, mlp, norms)
    in a plain model, `{(component, layer): path}`, read through the architecture layer.

    The bridge rewires the model it wraps, so the paths are read from a bridged deep copy (discarded);
    the model itself stays plain. `tokenizer` is only needed to boot the bridge (default: probe's word
    tokenizer). A component the family lacks raises `MissingComponentError` naming it.
    """
    if tokenizer is None:
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
                path = arch.path("attn.qkv", layer)  # a packed projection (only the bridge splits it)
            if path not in plain:
                raise MissingComponentError(arch.name, f"blocks.{layer}.{COMPONENTS[component]} as a module of "
                                                       "the plain model")
            paths[(component, layer)] = path
    return paths
