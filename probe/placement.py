"""Where a model's weights live: dtypes, devices, accelerate's device maps, and offloaded weights.

A model fits one device (`check_device`, `default_device`) or is spread over several, CPU and disk by
accelerate (`place`, `parse_device_map`, `parse_max_memory`, `Placement`); an offloaded weight sits on
the `meta` device outside a forward, so readers go through `resident` / `materialised`, which load it
one module at a time (the architecture layer and the weight fingerprint do).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from probe.errors import ProbeError

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> None:
    """`None`, `cpu`, `cuda`/`cuda:N` (with a GPU there) or `mps` (where available); else a `ProbeError`."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ProbeError(f"Unknown device {device!r}; use cpu, cuda (or cuda:N) or mps.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ProbeError(f"Device {device!r}: CUDA is not available here (no GPU, or torch built without "
                             "CUDA); use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ProbeError(f"Device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ProbeError(f"Device {device!r}: MPS is not available here; use --device cpu.")


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")


# ---- weights offloaded by accelerate (device_map with "cpu"/"disk") --------------------------------

def _has_offload_hook(module: torch.nn.Module) -> bool:
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # accelerate absent: nothing can be offloaded
        return False
    return has_offloaded_params(module)


@contextlib.contextmanager
def materialised(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every accelerate-offloaded parameter under `module` loaded onto its execution device for the
    block (accelerate's `align_module_device` on each hooked descendant: hooks sit on the leaves
    that own parameters), back on `meta` after. A no-op for a module without offloaded weights.
    Materialise one layer at a time, not the whole model: that is what offloading saves."""
    hooked = [m for m in module.modules() if _has_offload_hook(m)]
    if not hooked:
        yield module
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for sub in hooked:
            stack.enter_context(align_module_device(sub))
        yield module


def resident(module: torch.nn.Module, name: str = "weight") -> Any:
    """`module.<name>` (a parameter or buffer) as a real tensor, detached: as is when it is resident,
    else a copy loaded through accelerate (an offloaded weight is `meta` outside a forward)."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type != "meta":
        return value.detach()
    with materialised(module):
        value = getattr(module, name)
        if value.device.type == "meta":
            raise ProbeError(f"{type(module).__name__}.{name} is on the meta device and accelerate holds no "
                             "offloaded copy of it (a model built empty, never loaded).")
        return value.detach().clone()


def _offloaded_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The state-dict entry `name` of a dispatched model, loaded from accelerate's offload store."""
    owner, _, leaf = name.rpartition(".")
    return resident(model.get_submodule(owner) if owner else model, leaf)


# ---- models over several devices (accelerate) --------------------------------------------------------

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str]


def _input_device(hf_model: PreTrainedModel) -> torch.device:
    """The device token ids go to: the input embedding's execution device (accelerate's hook) or its weight's."""
    embedding = hf_model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    weight = embedding.weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _check_not_mixed(devices: Any, spec: str) -> None:
    """TransformerLens 4.3 refuses a map that mixes GPUs with CPU/disk offload (verified on CPU-only
    hardware, it says): say so before a long load, with the two maps that work."""
    devices = [str(d).lower() for d in devices]
    gpu = any(d.isdigit() or d.startswith("cuda") for d in devices)
    if gpu and any(d in ("cpu", "disk") for d in devices):
        raise ProbeError(f"{spec}: the device map puts some modules on a GPU and some on cpu/disk, which "
                         "TransformerLens 4.3 does not bridge; map everything to GPUs (e.g. --device-map auto with "
                         "--max-memory for the GPUs only) or everything to cpu/disk.")


def _check_placed_dtype(hf_model: PreTrainedModel, dtype: torch.dtype, spec: str) -> None:
    found = {p.dtype for p in hf_model.parameters() if p.is_floating_point() and p.device.type != "meta"}
    if found and found != {dtype}:
        raise ProbeError(f"{spec}: the dispatched model holds {sorted(map(str, found))} weights, not {dtype}; "
                         "cast it before dispatching (`load_model(..., dtype=..., device_map=...)` does).")


def _check_map_device(value: Any, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProbeError(f"{where}: a device is an index (0), 'cuda:N', 'cpu', 'mps' or 'disk', not {value!r}.")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        check_device(f"cuda:{value}")
        return value
    if value not in ("cpu", "disk"):
        check_device(value)
    return value


def parse_device_map(text: str | None) -> DeviceMap | None:
    """`--device-map`: a strategy (auto, balanced, balanced_low_0, sequential), a JSON file, or inline
    JSON `{module path: device}` (devices: an index, 'cuda:N', 'cpu', 'disk'); None stays None."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text in DEVICE_MAP_STRATEGIES:
        return text
    path = Path(text).expanduser()
    source = f"--device-map {text!r}"
    if not text.startswith("{"):
        if not path.is_file():
            raise ProbeError(f"{source}: not one of {', '.join(DEVICE_MAP_STRATEGIES)}, no such file, and not a "
                             "JSON object {module: device}.")
        text, source = path.read_text(encoding="utf-8"), f"device map {path}"
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProbeError(f"{source} is not valid JSON: {error.msg} at line {error.lineno}.") from error
    if not isinstance(mapping, dict) or not mapping:
        raise ProbeError(f"{source} must be a JSON object mapping module paths to devices, e.g. "
                         '{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "disk", ...}.')
    return {str(key): _check_map_device(value, f"{source} entry {key!r}") for key, value in mapping.items()}


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`--max-memory '0=20GiB,1=20GiB,cpu=60GiB'` -> `{0: '20GiB', 1: '20GiB', 'cpu': '60GiB'}`
    (accelerate's per-device budget for a device map strategy); None stays None."""
    if text is None or not text.strip():
        return None
    limits: dict[int | str, str] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, amount = part.partition("=")
        key, amount = key.strip(), amount.strip()
        if not sep or not key or not _MEMORY.match(amount):
            raise ProbeError(f"--max-memory {text!r}: each entry is DEVICE=AMOUNT, e.g. 0=20GiB or cpu=60GiB "
                             f"(not {part.strip()!r}).")
        device: int | str = int(key) if key.isdigit() else key
        if device not in ("cpu", "disk", "mps") and not isinstance(device, int):
            raise ProbeError(f"--max-memory {text!r}: {key!r} is not a device (0, 1, ..., cpu, mps).")
        limits[device] = amount if any(c.isalpha() for c in amount) else int(float(amount))
    return limits


def place(hf_model: PreTrainedModel, device_map: DeviceMap, max_memory: dict[int | str, Any] | None = None,
          offload_folder: str | Path | None = None) -> PreTrainedModel:
    """Dispatch an in-memory (not yet bridged) Hugging Face model over devices with accelerate: a
    strategy is turned into a map by `infer_auto_device_map` (whole decoder layers, tied weights kept
    together), an explicit map must cover every module. Weights mapped to "disk" are written to
    `offload_folder` (default: a temporary folder, removed with the process) and sit on `meta`."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError as error:
        raise ProbeError("--device-map needs accelerate: pip install accelerate.") from error
    no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
    dtype = next(hf_model.parameters()).dtype
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ProbeError(f"Unknown device map {device_map!r}; use {', '.join(DEVICE_MAP_STRATEGIES)} or a dict.")
        if device_map != "sequential":
            max_memory = get_balanced_memory(hf_model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    else:
        device_map = {key: _check_map_device(value, f"device map entry {key!r}") for key, value in device_map.items()}
    folder = offload_folder
    if "disk" in device_map.values() and folder is None:
        import tempfile

        holder = tempfile.TemporaryDirectory(prefix="probe-offload-")
        folder = holder.name
        hf_model.__dict__["_probe_offload_dir"] = holder  # removed when the model is
    try:
        dispatched = dispatch_model(hf_model, device_map=dict(device_map),
                                    offload_dir=str(folder) if folder is not None else None)
    except (ValueError, KeyError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ProbeError(f"Cannot place the model with device map {device_map}: {first[:300]}") from error
    return dispatched


def _check_placement(device: str | None, dtype: str, device_map: DeviceMap | None,
                     max_memory: dict[int | str, Any] | None, offload_folder: str | Path | None) -> None:
    check_device(device)
    if dtype not in DTYPES:
        raise ProbeError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    if device_map is not None and device is not None:
        raise ProbeError("--device and --device-map exclude each other: the map says where every layer goes.")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ProbeError("--max-memory and --offload-folder only apply with --device-map.")
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            _check_map_device(value, f"device map entry {key!r}")
        _check_not_mixed(device_map.values(), "--device-map")


@dataclass(frozen=True)
class Placement:
    """Where `load_model` puts the weights when they span devices (None: one device)."""

    device_map: DeviceMap | None = None
    max_memory: dict[int | str, Any] | None = None
    offload_folder: str | Path | None = None

    def hf_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keywords (accelerate places the weights while loading them)."""
        if self.device_map is None:
            return {}
        kwargs: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs
