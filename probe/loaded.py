"""The `LoadedModel` type: a TransformerLens 4 `TransformerBridge` around a Hugging Face model, plus
the facts analyzers need, the lock that makes one model safe to share between threads, and the weight
fingerprint results are cached under.

Every module of the core that reads a model takes a `LoadedModel`, so this module sits below them all:
it imports none of them. What `fused_reason`, `logits` and `generate` need from above (the route
decision, `probe.routing`, reads the model through the architecture layer and the fused path) comes in
as `LoadedModel.routes`, which `probe.hf` (the module that builds every model) installs on import.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from probe import prompting
from probe.errors import ProbeError, PromptTooLongError
from probe.heads import Head
from probe.placement import _has_offload_hook, _offloaded_tensor
from probe.runtime import poll

Positions = str | slice | Sequence[int] | None


@dataclass(frozen=True)
class Routes:
    """The route decision and the routed forwards a `LoadedModel` runs through (`probe.routing`,
    `probe.routed_decode`): `fused_reason(model)`, `logits(model, ids, positions)` and
    `generate(model, ids, max_new_tokens, stop_ids)`."""

    fused_reason: Callable[[LoadedModel], str | None]
    logits: Callable[[LoadedModel, torch.Tensor, Positions], torch.Tensor]
    generate: Callable[[LoadedModel, torch.Tensor, int, Sequence[int] | None], torch.Tensor]


def install_routes(routes: Routes) -> None:
    """Make every `LoadedModel` run through `routes` (`probe.hf` does, on import)."""
    LoadedModel.routes = routes


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
    # Objects derived from the model, kept with it (the architecture reader, the offload flag, the hub name,
    # an organism's build record); `probe.models.converted` carries over the keys without a leading "_".
    memo: dict[str, Any] = field(default_factory=dict)
    # Held while hooks are attached and while running: a model shared between threads (the app's
    # sessions) never runs one session's prompt through another session's interventions.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # Open `probe.interventions.intervene()` blocks, outermost first (`Attached` records): `logits` and
    # `generate` hand them to the fused path when it serves them all.
    intervening: list[Any] = field(default_factory=list, repr=False, compare=False)
    # False: `logits` / `generate` always run the bridge (as does PROBE_FUSED=0 for every model).
    fused_routing: bool = True
    # The route decision and the routed forwards, one set for every model (`probe.hf` installs them).
    routes: ClassVar[Routes | None] = None

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
        go through `probe.placement.materialised` / `resident` (the architecture layer does)."""
        cached = self.memo.get("_offloaded")
        if cached is None:
            cached = self.memo["_offloaded"] = any(_has_offload_hook(m) for m in self.hf_model.modules())
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
        return prompting.chat_prompt(self.tokenizer, user, system)

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
        `PROBE_FUSED=0`), the model not offloaded. The decision is `probe.routing.fused_reason`."""
        return self._routes().fused_reason(self)

    def _routes(self) -> Routes:
        if self.routes is None:
            raise ProbeError(f"{self.spec}: no routes are installed; build models with probe.hf.wrap_hf_model.")
        return self.routes

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
        return self._routes().logits(self, ids, positions)

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
        with one layer's activations instead of all of them."""
        hf = self.hf_model
        if not getattr(hf, "supports_gradient_checkpointing", False):
            yield  # nothing to save on this family: plain autograd
            return
        was_training = hf.training
        # transformers 5 names these activation_checkpointing_* (its gradient_checkpointing_* aliases warn)
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
        if ids.shape[0] != 1:
            raise ProbeError("generate() takes one prompt; loop over prompts (or batch with equal lengths).")
        self.check_fits(ids.shape[-1] + max_new_tokens)
        return self._routes().generate(self, ids, max_new_tokens, stop_ids)


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


# ---- the weights' fingerprint ---------------------------------------------------------------------

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
