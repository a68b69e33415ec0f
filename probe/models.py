"""Model specs → a loaded model: `load_model(spec)` and the loaders behind it.

A spec (`probe.specs`: embedded GGUF assets, tiny random models, `hf:` folders or hub ids, `gguf:`
files, registered specs) is loaded with transformers, placed (`probe.placement`: one device, or a
device map with CPU/disk offload) and wrapped (`probe.hf.wrap_hf_model`) as a `LoadedModel`
(`probe.loaded`). `converted` gives the same weights in another dtype or placement; `facts` the
architecture facts as a plain dict.

Load once per process (about 15–40 s for the embedded models on a 2-core CPU): tests use
session-scoped fixtures, the app `st.cache_resource`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from probe import assets, tiny
from probe.errors import ProbeError, UnknownModelError
from probe.hf import _quiet, wrap_hf_model
from probe.loaded import LoadedModel
from probe.placement import (
    DTYPES,
    DeviceMap,
    Placement,
    _check_placement,
    _dtype_name,
    parse_device_map,
    parse_max_memory,
    place,
)
from probe.routing import FUSED_ENV
from probe.specs import (
    DEFAULT_MODEL,
    PATH_PREFIXES,
    REGISTERED_SPECS,
    SPECS,
    ModelSpec,
    RegisteredSpec,
    list_specs,
    register_spec,
    spec_summary,
)

# What code outside the core imports from here: the loaders, and the names a caller of them needs.
__all__ = ["DEFAULT_MODEL", "DTYPES", "FUSED_ENV", "PATH_PREFIXES", "REGISTERED_SPECS", "SPECS", "LoadedModel",
           "ModelSpec", "RegisteredSpec", "converted", "facts", "facts_json", "list_specs", "load_model", "parse_device_map",
           "parse_max_memory", "plain_copy", "register_spec", "spec_summary", "wrap_hf_model"]


def plain_copy(model: LoadedModel) -> PreTrainedModel:
    """A fresh, un-bridged Hugging Face model with a copy of `model`'s weights (the bridge rewires the
    model it wraps, so a bridged model cannot be re-dispatched or re-cast in place)."""
    if model.device_map:
        raise ProbeError(f"{model.spec} is dispatched over devices already; load it again to place it differently.")
    hf = model.hf_model
    with torch.random.fork_rng():
        fresh = type(hf)(hf.config)
    bridged = {key.replace("._original_component", ""): value for key, value in hf.state_dict().items()}
    state = {}
    for key in fresh.state_dict():
        if key not in bridged:
            raise ProbeError(f"{model.spec}: no weight {key} in the bridged model; cannot copy it.")
        state[key] = bridged[key].detach().clone()
    fresh.load_state_dict(state, strict=True)
    if getattr(hf.config, "architectures", None):
        fresh.config.architectures = list(hf.config.architectures)
    return fresh.eval()


def converted(model: LoadedModel, dtype: str | None = None, device: str | None = None,
              device_map: DeviceMap | None = None, max_memory: dict[int | str, Any] | None = None,
              offload_folder: str | Path | None = None) -> LoadedModel:
    """The same weights as a new `LoadedModel` in another dtype, on another device or dispatched over
    devices (planted and organism models are built in memory, so this is how they run in bf16 or
    offloaded); `model` itself is left as it is. Public `memo` entries are carried over."""
    dtype = dtype or _dtype_name(model.dtype)
    _check_placement(device, dtype, device_map, max_memory, offload_folder)
    hf = plain_copy(model).to(DTYPES[dtype])
    if device_map is not None:
        hf = place(hf, device_map, max_memory, offload_folder)
    copy = wrap_hf_model(hf, model.tokenizer, model.spec, hub_name=model.memo.get("hub_name", model.spec),
                         device=None if device_map is not None else (device or model.device), dtype=dtype)
    copy.memo.update({k: v for k, v in model.memo.items() if not k.startswith("_") and k != "hub_name"})
    return copy


def _wrap_placed(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str, hub_name: str,
                 device: str | None, dtype: str, placement: Placement) -> LoadedModel:
    """An in-memory model wrapped on one device, or cast and dispatched first."""
    if placement.device_map is not None:
        hf_model = place(hf_model.to(DTYPES[dtype]), placement.device_map, placement.max_memory,
                         placement.offload_folder)
    return wrap_hf_model(hf_model, tokenizer, spec, hub_name=hub_name, device=device, dtype=dtype)


def _load_tiny(name: str, device: str | None, dtype: str, placement: Placement = Placement()) -> LoadedModel:
    tokenizer = tiny.word_tokenizer(name=f"probe/{name}")
    vocab = len(tokenizer)
    if name == "tiny-llama":
        model = tiny.tiny_llama(vocab, n_heads=4, n_kv_heads=4)
    elif name == "tiny-gqa":
        model = tiny.tiny_llama(vocab, n_heads=4, n_kv_heads=2, seed=1)
    else:
        model = tiny.tiny_gpt2(vocab)
    return _wrap_placed(model, tokenizer, name, f"probe/{name}", device, dtype, placement)


def _load_pretrained(source: str, spec: str, gguf_file: str | None, hub_name: str,
                     device: str | None, dtype: str, placement: Placement = Placement()) -> LoadedModel:
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs,
                                                         **placement.hf_kwargs())
    except (OSError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # a cut-off "one of:" line
        raise UnknownModelError(
            f"Could not load {spec!r} from {source!r}: {first[:300]} "
            "(a hub id needs network or a filled Hugging Face cache; a local folder needs config.json, "
            "weights and tokenizer files; a GGUF path must point at a .gguf file)."
        ) from error
    return wrap_hf_model(model, tokenizer, spec, hub_name=hub_name or source, device=device, dtype=dtype)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "tokenizer_config.json")


def _check_hf_source(source: str) -> None:
    """`hf:<folder>`: an existing folder with config.json, weights and a tokenizer; else a one-line error.

    A source that is not a folder here and reads like a hub id (`name` or `org/name`) is left to
    transformers (cache or network).
    """
    if not source.strip():
        raise UnknownModelError("hf: needs a local folder or a hub id, e.g. hf:./my-model or hf:gpt2.")
    path = Path(source).expanduser()
    if not path.exists():
        if _HUB_ID.match(source) and not source.startswith("."):
            return
        raise UnknownModelError(f"Could not load 'hf:{source}': the folder {path} does not exist.")
    if not path.is_dir():
        raise UnknownModelError(f"Could not load 'hf:{source}': {path} is a file; hf: takes a model folder "
                                "(use gguf:<file> for a .gguf file).")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_GLOBS):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise UnknownModelError(f"Could not load 'hf:{source}': {path} is not a Hugging Face model folder; it has no "
                                f"{', no '.join(missing)}.")


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "float32",
               progress: Callable[[str], None] | None = None, device_map: DeviceMap | None = None,
               max_memory: dict[int | str, Any] | None = None,
               offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a model by spec (see module docstring). Raises `ProbeError` subclasses with the fix.

    `device_map` (accelerate: "auto", "balanced", "sequential" or `{module path: device}` with
    devices an index, "cpu" or "disk"), `max_memory` (`{0: "20GiB", "cpu": "60GiB"}`) and
    `offload_folder` spread a model larger than one device over several, CPU and disk; they exclude
    `device`. See docs/SCALE.md."""
    _check_placement(device, dtype, device_map, max_memory, offload_folder)
    placement = Placement(device_map, max_memory, offload_folder)
    say = progress or (lambda message: None)
    if spec in SPECS:
        named = SPECS[spec]
        if named.asset is None:
            return _load_tiny(spec, device, dtype, placement)
        path = assets.asset_file(named.asset)
        say(f"loading {spec} from {path} (de-quantising GGUF; ~15-40 s on CPU)")
        return _load_pretrained(str(path.parent), spec, named.gguf_file, named.hub_name, device, dtype, placement)
    if spec in REGISTERED_SPECS:
        registered = REGISTERED_SPECS[spec]
        if not registered.available():
            raise UnknownModelError(f"{spec} is not built yet: {registered.missing_hint or registered.description}")
        say(f"loading {spec}")
        if device_map is None:
            return registered.loader(device, dtype)
        return converted(registered.loader("cpu", dtype), device_map=device_map, max_memory=max_memory,
                         offload_folder=offload_folder)
    if spec.startswith("hf:"):
        source = spec[3:]
        _check_hf_source(source)
        say(f"loading {source} with transformers")
        return _load_pretrained(source, spec, None, "", device, dtype, placement)
    if spec.startswith("gguf:"):
        path = Path(spec[5:]).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"GGUF file {path} does not exist.")
        say(f"loading {path} (de-quantising GGUF)")
        return _load_pretrained(str(path.parent), spec, path.name, "", device, dtype, placement)
    raise UnknownModelError(
        f"Unknown model spec {spec!r}. Valid specs: {', '.join([*SPECS, *REGISTERED_SPECS])}, "
        "or hf:<local dir or hub id>, or gguf:<path to .gguf>."
    )


def facts(model: LoadedModel) -> dict[str, Any]:
    """The architecture facts as a plain dict (for reports, the app and `--json`)."""
    return {
        "spec": model.spec, "architecture": model.architecture, "n_layers": model.n_layers,
        "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "group_size": model.group_size,
        "d_head": model.d_head, "d_model": model.d_model, "d_vocab": model.d_vocab,
        "n_ctx": model.n_ctx, "device": model.device, "dtype": str(model.dtype).replace("torch.", ""),
        "device_map": _map_summary(model.device_map),
        "chat_template": bool(model.chat_template), "fingerprint": model.fingerprint,
    }


def _map_summary(device_map: dict[str, Any] | None) -> dict[str, list[str]] | None:
    """`{device: [module paths]}` of a dispatched model (JSON keys are strings), None on one device."""
    if not device_map:
        return None
    summary: dict[str, list[str]] = {}
    for module, device in device_map.items():
        summary.setdefault(str(device), []).append(module)
    return summary


def facts_json(model: LoadedModel) -> str:
    return json.dumps(facts(model), indent=2)
