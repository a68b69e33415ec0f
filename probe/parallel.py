"""Shards of one analysis: map a per-item function over items (samples, heads, candidates), serially
or on Ray actors that each hold the model.

An analyzer whose work splits into independent items calls `map_items(model, fn, items)` where `fn` is
a top-level function `fn(model, item)` (picklable by reference) and the items are plain data. By
default that is a loop in this process (`SerialMapper`); inside `using(RayMapper(...))` (what
`analyses.cluster` does for a sharded job) the items go, in contiguous chunks, to actors that loaded
the same model once (same spec, device and dtype: their weight fingerprint is checked against the
caller's model before any item is sent) and ran `fn` there. Results come back in item order, so the
merge is the serial loop's own code: a sharded run equals the serial one when `fn` is deterministic
at the same thread count.

Ray is optional (`pip install probe[cluster]`): nothing here imports it until a `RayMapper` starts.
"""

from __future__ import annotations

import contextvars
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from probe.errors import ProbeError

if TYPE_CHECKING:
    from probe.loaded import LoadedModel

T = TypeVar("T")
R = TypeVar("R")
# on_count(items done, items in all): the caller turns the counts into its own `probe.progress.Progress` lines
CountCallback = Callable[[int, int], None]
RAY_MISSING = "Ray is not installed: `pip install probe[cluster]` (or `pip install 'ray[default]'`) for --ray and probe sweep."


class Mapper(Protocol):
    def map(self, model: LoadedModel, fn: Callable[[LoadedModel, T], R], items: Sequence[T],
            on_count: CountCallback | None = None) -> list[R]:
        """`[fn(model, item) for item in items]`, wherever it runs; results in item order."""
        ...


class SerialMapper:
    """The loop in this process on the caller's model (the default everywhere)."""

    def map(self, model: LoadedModel, fn: Callable[[LoadedModel, T], R], items: Sequence[T],
            on_count: CountCallback | None = None) -> list[R]:
        results = []
        for index, item in enumerate(items):
            if on_count is not None:
                on_count(index, len(items))
            results.append(fn(model, item))
        if on_count is not None:
            on_count(len(items), len(items))
        return results


_CURRENT: contextvars.ContextVar[Mapper] = contextvars.ContextVar("probe_mapper", default=SerialMapper())


def current() -> Mapper:
    return _CURRENT.get()


@contextmanager
def using(mapper: Mapper) -> Iterator[Mapper]:
    """Make `map_items` in this context (thread / task) use `mapper`."""
    token = _CURRENT.set(mapper)
    try:
        yield mapper
    finally:
        _CURRENT.reset(token)


def map_items(model: LoadedModel, fn: Callable[[LoadedModel, T], R], items: Sequence[T],
              on_count: CountCallback | None = None) -> list[R]:
    """What analyzers call for their natural shards: the current mapper's `map` (serial by default)."""
    return current().map(model, fn, list(items), on_count)


# ---- models rebuilt elsewhere ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """How another process loads the same model: `load_model(spec, device, dtype)`, or a top-level
    factory `"module:function"` returning a `LoadedModel` (planted models built in code)."""

    spec: str
    device: str | None = None
    dtype: str = "float32"
    factory: str | None = None

    def load(self) -> LoadedModel:
        if self.factory:
            module, _, name = self.factory.partition(":")
            try:
                build = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as error:
                raise ProbeError(f"Model factory {self.factory!r} cannot be imported here: {error}.") from None
            return build()
        from probe.models import load_model

        return load_model(self.spec, device=self.device, dtype=self.dtype)

    def uses_gpu(self) -> bool:
        return (self.device or "").startswith("cuda")


def import_ray() -> Any:
    """The `ray` module, or a one-line `ProbeError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ProbeError(RAY_MISSING) from None
    return ray


class _ShardWorker:
    """A Ray actor's state: the model, loaded once, and the thread count every shard runs with."""

    def __init__(self, source: ModelSource, threads: int) -> None:
        from probe.runtime import set_threads

        set_threads(threads)
        self.model = source.load()

    def fingerprint(self) -> str:
        return self.model.fingerprint

    def run(self, fn: Callable[[Any, Any], Any], items: list[Any]) -> list[Any]:
        return [fn(self.model, item) for item in items]


def chunks(items: Sequence[T], n: int) -> list[list[T]]:
    """`items` cut into at most `n` contiguous chunks of near-equal size (order kept)."""
    size = max(1, math.ceil(len(items) / max(1, n)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class RayMapper:
    """`n_actors` Ray actors, each with the model of `source`; `map` sends each a contiguous chunk.

    An actor lost mid-shard (its process killed, its node gone) is restarted by Ray, loads the model
    again and reruns the shard (`max_restarts` / `max_task_retries`), so a map either completes
    whole or raises. Use as a context manager (or call `close`) to release the actors.
    """

    def __init__(self, source: ModelSource, n_actors: int, threads: int = 1, max_restarts: int = 2,
                 chunks_per_actor: int = 1) -> None:
        if n_actors < 1:
            raise ProbeError(f"A sharded run needs at least 1 actor, not {n_actors}.")
        self.source, self.n_actors, self.threads = source, int(n_actors), int(threads)
        self.max_restarts, self.chunks_per_actor = max_restarts, max(1, chunks_per_actor)
        self._actors: list[Any] = []
        self._checked: set[str] = set()
        self.items_per_actor: list[int] = [0] * self.n_actors  # what each actor was sent (logs, tests)

    def _start(self) -> list[Any]:
        if not self._actors:
            ray = import_ray()
            gpus = 1 if self.source.uses_gpu() else 0
            actor = ray.remote(num_cpus=self.threads, num_gpus=gpus,
                               max_restarts=self.max_restarts, max_task_retries=self.max_restarts)(_ShardWorker)
            self._actors = [actor.remote(self.source, self.threads) for _ in range(self.n_actors)]
        return self._actors

    def map(self, model: LoadedModel, fn: Callable[[LoadedModel, T], R], items: Sequence[T],
            on_count: CountCallback | None = None) -> list[R]:
        items = list(items)
        if not items:
            return []
        ray = import_ray()
        actors = self._start()
        if model.fingerprint not in self._checked:
            found = ray.get([a.fingerprint.remote() for a in actors])
            if any(f != model.fingerprint for f in found):
                raise ProbeError(f"The shard actors loaded {sorted(set(found))} from {self.source}, not the caller's "
                                 f"model {model.fingerprint} ({model.spec}); shards must run on the same weights.")
            self._checked.add(model.fingerprint)
        parts = chunks(items, len(actors) * self.chunks_per_actor)
        pending = {}
        for i, part in enumerate(parts):
            pending[actors[i % len(actors)].run.remote(fn, part)] = i
            self.items_per_actor[i % len(actors)] += len(part)
        results: list[list[R] | None] = [None] * len(parts)
        done = 0
        if on_count is not None:
            on_count(0, len(items))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                done += len(parts[index])
                if on_count is not None:
                    on_count(done, len(items))
        return [r for part in results for r in part]  # type: ignore[union-attr]

    def close(self) -> None:
        if self._actors:
            ray = import_ray()
            for actor in self._actors:
                ray.kill(actor)
            self._actors = []

    def __enter__(self) -> RayMapper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
