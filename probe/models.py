"""Model specs → a loaded model: a TransformerLens 4 `TransformerBridge` plus the facts analyzers need.

Specs:
- `smollm2-135m` (default) and `gemma3-270m`: embedded, from the pinned GGUF assets (`probe fetch`);
- `tiny-llama`, `tiny-gqa`, `tiny-gpt2`: seeded random weights from a local config, in-process tokenizer;
- `hf:<local dir or hub id>` and `gguf:<path to .gguf>`: any model a user has.

Load once per process (about 15–40 s for the embedded models on a 2-core CPU): tests use
session-scoped fixtures, the app `st.cache_resource`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from probe import assets
from probe.errors import ProbeError, PromptTooLongError, UnknownModelError
from probe.heads import Head
from probe.runtime import poll

DEFAULT_MODEL = "smollm2-135m"
# `PROBE_FUSED=0` sends every `LoadedModel.logits` / `generate` through the bridge (comparison, debugging);
# per model: `model.fused_routing = False`. See docs/fused.md.
FUSED_ENV = "PROBE_FUSED"
Positions = str | slice | Sequence[int] | None


@dataclass(frozen=True)
class ModelSpec:
    """A named way to obtain a model; `asset` names the offline asset it needs, if any."""

    name: str
    description: str
    asset: str | None = None
    gguf_file: str | None = None
    hub_name: str = ""  # the upstream name, given to the bridge for its architecture table
    embedded: bool = False


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct (Llama arch, 30L x 9H, 3 KV heads), 4-bit GGUF",
                  asset="smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  hub_name="HuggingFaceTB/SmolLM2-135M-Instruct", embedded=True),
        ModelSpec("gemma3-270m", "Gemma-3-270m base (18L x 4H, 1 KV head), Q4_K_M GGUF",
                  asset="gemma3-270m", gguf_file="gemma-3-270m-q4_k_m.gguf",
                  hub_name="google/gemma-3-270m", embedded=True),
        ModelSpec("tiny-llama", "random Llama, 2L x 4H (MHA), d_model 64, word tokenizer; for tests",
                  hub_name="probe/tiny-llama"),
        ModelSpec("tiny-gqa", "random Llama, 2L x 4H with 2 KV heads (GQA), d_model 64; for tests",
                  hub_name="probe/tiny-gqa"),
        ModelSpec("tiny-gpt2", "random GPT-2 shape, 2L x 4H, LayerNorm/GELU/learned positions; for tests",
                  hub_name="probe/tiny-gpt2"),
    )
}
PATH_PREFIXES = ("hf:", "gguf:")


@dataclass(frozen=True)
class ExtraSpec:
    """A spec registered from outside the core (e.g. a model organism built by an analyzer module),
    so the core can load it without importing the code that builds it."""

    name: str
    description: str
    loader: Callable[[str | None, str], LoadedModel]
    available: Callable[[], bool]
    missing_hint: str = ""


EXTRA_SPECS: dict[str, ExtraSpec] = {}


def register_spec(name: str, description: str, loader: Callable[[str | None, str], "LoadedModel"],
                  available: Callable[[], bool], missing_hint: str = "") -> None:
    """Make `load_model(name)` call `loader(device, dtype)`; `available()` says whether it loads offline now."""
    EXTRA_SPECS[name] = ExtraSpec(name, description, loader, available, missing_hint)


def list_specs() -> list[tuple[ModelSpec, bool]]:
    """Every named spec and whether it can be loaded offline right now."""
    return [(spec, spec.asset is None or assets.is_available(spec.asset)) for spec in SPECS.values()]


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


@dataclass
class LoadedModel:
    """A bridged model and the architecture facts every analyzer needs.

    `bridge` is the TransformerLens 4 `TransformerBridge` (hooks, caches); `hf_model` the wrapped
    Hugging Face model (same weights, no copy).

    One model may serve several threads (the app's sessions). Every forward through it holds `lock`
    for the whole forward, and hooks are attached only while `lock` is held, so no thread ever runs
    through another thread's hooks; see `_serialise`. Run through the methods below (`logits`,
    `run_with_cache`, `run_with_hooks`, `hooks`, `generate`); direct `bridge`/`hf_model` calls are
    locked too.
    """

    spec: str
    bridge: Any
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: str
    dtype: torch.dtype
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    architecture: str
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Held while hooks are attached and while running: a model shared between threads (the app's
    # sessions) never runs one session's prompt through another session's interventions.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # Open `probe.interventions.intervene()` blocks, outermost first (`Attached` records): `logits` and
    # `generate` hand them to the fused path when it serves them all.
    intervening: list[Any] = field(default_factory=list, repr=False, compare=False)
    # False: `logits` / `generate` always run the bridge (as does PROBE_FUSED=0 for every model).
    fused_routing: bool = True

    def __post_init__(self) -> None:
        _serialise(self)

    # ---- placement ----------------------------------------------------------------------------
    @property
    def device_map(self) -> dict[str, Any] | None:
        """Where accelerate put each module (`hf_device_map`: a device index, "cpu" or "disk"); None
        for a model on one device."""
        placed = getattr(self.hf_model, "hf_device_map", None)
        return dict(placed) if placed else None

    @property
    def offloaded(self) -> bool:
        """Whether some weights sit on the `meta` device until used (CPU/disk offload): readers must
        go through `probe.models.materialised` / `resident` (the architecture layer does)."""
        cached = self.extra.get("_offloaded")
        if cached is None:
            cached = self.extra["_offloaded"] = any(_has_offload_hook(m) for m in self.hf_model.modules())
        return bool(cached)

    # ---- heads ------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The key/value head that query head `head` reads (HF `repeat_kv` / TL `repeat_interleave`)."""
        return head // self.group_size

    def query_heads_of(self, kv_head: int) -> list[int]:
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))

    def all_heads(self) -> list[Head]:
        return [Head(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]

    @property
    def shape_text(self) -> str:
        return (f"{self.spec}: {self.n_layers} layers x {self.n_heads} query heads "
                f"({self.n_kv_heads} key/value heads)")

    # ---- text ---------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """The model's chat template applied to one user turn, ready for the assistant's answer."""
        if not self.chat_template:
            raise ProbeError(
                f"{self.spec} has no chat template; use the plain template instead "
                "(e.g. `template='plain'`, which formats the prompt as 'Question: ...\\nAnswer:')."
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> torch.Tensor:
        """Token ids `[1, T]` on the model's device, following the model's own BOS convention."""
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
        return ids.to(self.device)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode(list(ids))

    def token_strings(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx:
            raise PromptTooLongError(
                f"The prompt is {n_tokens} tokens long but {self.spec} has a context of {self.n_ctx} tokens."
            )

    # ---- running ------------------------------------------------------------------------------
    def fused_reason(self) -> str | None:
        """Why `logits` / `generate` would run the bridge now; None when they take the fused path
        (`probe.fused`: the model's own SDPA attention, no pattern materialised). The fused path is taken
        only where it is exact: no hook on a hook point it would skip (`hook_pattern`, `hook_attn_scores`,
        ...), every open `intervene()` block one it serves (head-output, streaming, and query scaling /
        uniform attention through the kernel's query), routing not switched off (`fused_routing`,
        `PROBE_FUSED=0`), the model not offloaded."""
        if not self.fused_routing:
            return "fused_routing is off on this model"
        if self.offloaded:
            return "weights offloaded to CPU/disk (device_map): the bridge's forward materialises them per module"
        if os.environ.get(FUSED_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
            return f"{FUSED_ENV}={os.environ[FUSED_ENV]}"
        from probe.fused import unserved_reason

        with self.lock, self._handed_over():
            return unserved_reason(self, self._open_interventions())

    def _open_interventions(self) -> list[Any]:
        return [i for record in self.intervening for i in record.interventions]

    @contextlib.contextmanager
    def _handed_over(self) -> Iterator[None]:
        """The open `intervene()` blocks' hooks switched off: the fused path applies their interventions."""
        records = list(self.intervening)
        for record in records:
            record.handed_over = True
        try:
            yield
        finally:
            for record in records:
                record.handed_over = False

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, positions: Positions = None) -> torch.Tensor:
        """Logits `[batch, pos, vocab]` of one forward pass (hooks and `intervene()` blocks in effect).

        On the fused path (`probe.fused`) where that is exact (see `fused_reason`), else through the bridge;
        the two agree to float rounding (docs/fused.md). `positions`: None (every position), "last", a
        slice or position indices: only those positions are returned (and, fused, unembedded)."""
        self.check_fits(ids.shape[-1])
        with self.lock:
            if self.fused_reason() is None:
                from probe.fused import FusedPathError, fused_logits

                try:
                    with self._handed_over():
                        return fused_logits(self, ids, self._open_interventions(), positions=positions)
                except FusedPathError:  # a structural mismatch found on entry: everything is restored
                    pass
            return _pick_positions(self.bridge(ids), positions)

    @torch.no_grad()
    def run_with_cache(self, ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The bridge's `run_with_cache` (logits and an `ActivationCache`; `names_filter=` to keep a few),
        holding the lock: hooks of other threads never fire in it, nor its caching hooks in theirs."""
        with self.lock:
            return self.bridge.run_with_cache(ids, **kwargs)

    def run_with_hooks(self, ids: torch.Tensor, fwd_hooks: Sequence[tuple[Any, Callable[..., Any]]] = (),
                       **kwargs: Any) -> Any:
        """One forward with `fwd_hooks` (TransformerLens `(name or filter, fn)` pairs), holding the lock."""
        with self.lock:
            return self.bridge.run_with_hooks(ids, fwd_hooks=list(fwd_hooks), **kwargs)

    @contextlib.contextmanager
    def recompute_layers_in_backward(self) -> Iterator[None]:
        """Inside the block, a forward with autograd keeps only each decoder layer's input and the
        backward recomputes the layer (Hugging Face's gradient checkpointing, non-reentrant so that
        parameters outside the model, such as Duo's gates, still get their gradients). Hooks must
        stay attached until the backward ends: the recomputation runs them again. Memory then grows
        with one layer's activations instead of all of them (Duo's quick training: 7.0 GB peak before)."""
        hf = self.hf_model
        if not getattr(hf, "supports_gradient_checkpointing", False):
            yield  # nothing to save on this family: plain autograd
            return
        was_training = hf.training
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn)
        non_reentrant = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):
            def enable() -> None:
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
            disable = hf.activation_checkpointing_disable
        else:
            def enable() -> None:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
            disable = hf.gradient_checkpointing_disable
        # training mode switches dropout on (GPT-2: p = 0.1): held at 0 for the block, restored after
        dropouts = [m for m in hf.modules() if isinstance(m, torch.nn.Dropout)]
        rates = [m.p for m in dropouts]
        attention = [m for m in hf.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
        attention_rates = [m.attention_dropout for m in attention]
        with self.lock:
            enable()
            hf.train()  # HF recomputes only in training mode; the weights stay frozen
            for module in dropouts:
                module.p = 0.0
            for module in attention:
                module.attention_dropout = 0.0
            try:
                yield
            finally:
                for module, rate in zip(dropouts, rates):
                    module.p = rate
                for module, rate in zip(attention, attention_rates):
                    module.attention_dropout = rate
                disable()
                hf.train(was_training)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[Any, Callable[..., Any]]] = (), **kwargs: Any) -> Iterator[Any]:
        """Attach `fwd_hooks` for the block, holding the lock for all of it (other threads wait);
        yields the bridge."""
        with self.lock, self.bridge.hooks(fwd_hooks=list(fwd_hooks), **kwargs) as bridge:
            yield bridge

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 16,
                 stop_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Greedy continuation `[1, n_new]`, stopping after an EOS/stop token (not included).

        On the fused path where that is exact (`fused_reason`; positions from the cache length), else it
        runs the wrapped HF model (whose modules the bridge has replaced, so every hook fires) with a
        full `DynamicCache`: unlike a sliding-window cache it keeps every key in every layer, so the
        interventions' absolute positions (KV length - query length) stay right on Gemma's windowed layers.
        """
        from probe.generation import greedy_decode

        if ids.shape[0] != 1:
            raise ProbeError("generate() takes one prompt; loop over prompts (or batch with equal lengths).")
        self.check_fits(ids.shape[-1] + max_new_tokens)
        stops = set(stop_ids or ())
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        with self.lock:
            if self.fused_reason() is None:
                from probe.fused import FusedPathError, fused_generate

                try:
                    with self._handed_over():
                        return fused_generate(self, ids, max_new_tokens, self._open_interventions(), stop_ids)
                except FusedPathError:  # a structural mismatch found on entry: everything is restored
                    pass
            return greedy_decode(self.hf_model, ids, max_new_tokens, stops)


def _pick_positions(logits: torch.Tensor, positions: Positions) -> torch.Tensor:
    """The bridge's full logits cut to `positions`, as `probe.fused.fused_logits` returns them."""
    if positions is None:
        return logits
    if isinstance(positions, str):
        if positions != "last":
            raise ProbeError(f"positions={positions!r}: use 'last', None (every position), a slice or indices.")
        return logits[:, -1:]
    if isinstance(positions, slice):
        chosen = logits[:, positions]
    else:
        chosen = logits[:, torch.as_tensor(list(positions), dtype=torch.long, device=logits.device)]
    if chosen.shape[1] == 0:
        raise ProbeError(f"positions={positions!r} selects no position of a {logits.shape[1]}-token input.")
    return chosen


# ---- one thread at a time ---------------------------------------------------------------------------

# The bridge's methods that attach hooks and run (`hooks` is a context manager: locked for its block).
_LOCKED_BRIDGE_METHODS = ("run_with_cache", "run_with_hooks", "generate", "hf_generate", "generate_stream")
# The bridge's methods that leave hooks attached after they return: only the lock's holder may call them.
_OWNER_ONLY_BRIDGE_METHODS = ("add_hook", "add_perma_hook", "add_caching_hooks", "cache_all", "cache_some")


def _holding(model: LoadedModel, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with model.lock:
            return method(*args, **kwargs)
    return locked


def _holder_only(model: LoadedModel, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not model.lock._is_owned():
            raise ProbeError(
                f"{method.__name__} leaves hooks on a model that other threads share; attach hooks inside "
                "`with model.lock:` (and remove them before leaving it), or use `model.hooks(...)` / "
                "`probe.interventions.intervene(...)`, which remove them on exit."
            )
        return method(*args, **kwargs)
    return checked


def _serialise(model: LoadedModel) -> None:
    """Make every forward through `model`, and every hook registration on it, hold `model.lock`.

    Structural, so no caller can forget it: the HF model's `forward` (which every path ends in: the
    bridge's `forward`, `run_with_cache`, `run_with_hooks`, `generate`, direct `hf_model(...)` calls and
    cached decoding) takes the lock; the bridge's hook-attaching methods take it from before they attach
    until after they remove (`hooks` for its whole block); the methods that leave hooks attached refuse
    to run without it. The wrappers are instance attributes that read `model.lock` on each call;
    wrapping again (a second `LoadedModel` on the same bridge, e.g. `dataclasses.replace`) re-wraps the
    class's own methods.
    """
    bridge, hf = model.bridge, model.hf_model
    hf.__dict__.pop("forward", None)
    locked_forward = _holding(model, hf.forward)

    @functools.wraps(locked_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        poll()  # the automatic thread policy re-decides here, on the computing thread
        return locked_forward(*args, **kwargs)

    hf.__dict__["forward"] = forward
    for name in (*_LOCKED_BRIDGE_METHODS, *_OWNER_ONLY_BRIDGE_METHODS, "hooks"):
        bridge.__dict__.pop(name, None)
    for name in _LOCKED_BRIDGE_METHODS:
        if hasattr(bridge, name):
            bridge.__dict__[name] = _holding(model, getattr(bridge, name))
    for name in _OWNER_ONLY_BRIDGE_METHODS:
        if hasattr(bridge, name):
            bridge.__dict__[name] = _holder_only(model, getattr(bridge, name))
    attach = bridge.hooks

    @contextlib.contextmanager
    @functools.wraps(attach)
    def hooks(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with model.lock, attach(*args, **kwargs) as hooked:
            yield hooked

    bridge.__dict__["hooks"] = hooks


# ---- loading -------------------------------------------------------------------------------------

def _fingerprint(spec: str, model: PreTrainedModel, dtype: torch.dtype | None = None) -> str:
    """A short hash of the config and a sample of every weight: results are cached under it.

    Where the weights are does not enter it (a model split over devices or offloaded to disk has the
    fingerprint of the same weights on one device: offloaded tensors are read through accelerate, one
    module at a time); a dtype other than float32 does (bf16 results are not fp32 results, even where
    the sampled weights round to the same values)."""
    digest = hashlib.sha256(spec.encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    if dtype is not None and dtype != torch.float32:
        digest.update(f"dtype={dtype}".encode())
    for name, param in model.state_dict().items():
        if param.device.type == "meta":
            param = _offloaded_tensor(model, name)
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float64).cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


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
    model.extra["hub_name"] = hub_name or spec
    return model


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
    offloaded); `model` itself is left as it is. Public `extra` entries are carried over."""
    dtype = dtype or _dtype_name(model.dtype)
    _check_placement(device, dtype, device_map, max_memory, offload_folder)
    hf = plain_copy(model).to(DTYPES[dtype])
    if device_map is not None:
        hf = place(hf, device_map, max_memory, offload_folder)
    copy = wrap_hf_model(hf, model.tokenizer, model.spec, hub_name=model.extra.get("hub_name", model.spec),
                         device=None if device_map is not None else (device or model.device), dtype=dtype)
    copy.extra.update({k: v for k, v in model.extra.items() if not k.startswith("_") and k != "hub_name"})
    return copy


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")


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


def _wrap_placed(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: str, hub_name: str,
                 device: str | None, dtype: str, placement: Placement) -> LoadedModel:
    """An in-memory model wrapped on one device, or cast and dispatched first."""
    if placement.device_map is not None:
        hf_model = place(hf_model.to(DTYPES[dtype]), placement.device_map, placement.max_memory,
                         placement.offload_folder)
    return wrap_hf_model(hf_model, tokenizer, spec, hub_name=hub_name, device=device, dtype=dtype)


def _load_tiny(name: str, device: str | None, dtype: str, placement: Placement = Placement()) -> LoadedModel:
    from probe import tiny

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
    if spec in EXTRA_SPECS:
        extra = EXTRA_SPECS[spec]
        if not extra.available():
            raise UnknownModelError(f"{spec} is not built yet: {extra.missing_hint or extra.description}")
        say(f"loading {spec}")
        if device_map is None:
            return extra.loader(device, dtype)
        return converted(extra.loader("cpu", dtype), device_map=device_map, max_memory=max_memory,
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
        f"Unknown model spec {spec!r}. Valid specs: {', '.join([*SPECS, *EXTRA_SPECS])}, "
        "or hf:<local dir or hub id>, or gguf:<path to .gguf>."
    )


def _asset_state_text(asset: str | None) -> str:
    """"ready", or what is wrong with the spec's asset and the command that fixes it."""
    state = "ready" if asset is None else assets.asset_state(asset)
    return {"ready": "ready", "missing": f"missing: run `probe fetch {asset}`",
            "corrupt": f"corrupt: run `probe fetch --force {asset}`"}[state]


def spec_summary() -> str:
    """Text for `probe models`: each spec, what it is, and whether it is available offline now."""
    rows = [(spec.name, _asset_state_text(spec.asset), spec.description) for spec in SPECS.values()]
    rows += [(extra.name, "ready" if extra.available() else f"missing: {extra.missing_hint}", extra.description)
             for extra in EXTRA_SPECS.values()]
    rows += [("hf:<dir|id>", "", "any Hugging Face causal LM (local folder, or hub id with network)"),
             ("gguf:<path>", "", "any GGUF file transformers can read")]
    name_width = max(len(name) for name, _, _ in rows)  # columns fit the longest name (e.g. an organism's)
    state_width = max(len(state) for _, state, _ in rows)
    return "\n".join(f"{name:{name_width}s}  {state:{state_width}s}  {text}".rstrip() for name, state, text in rows)


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
