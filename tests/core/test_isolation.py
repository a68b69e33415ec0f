"""A shared model never runs one thread's (or app session's) forward through another's hooks.

Each test forces the interleaving instead of hoping for it: the thread that holds the model (inside
`intervene`, or inside a locked block) waits until the other thread is provably blocked on the model's
lock, or has finished; then it checks what the other thread saw. A `WatchedLock` replaces the model's
lock to report "a thread is waiting". Every wait has a timeout, so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from probe.errors import ProbeError
from probe.heads import Head
from probe.interventions import active_hook_count, capture_z, head_means, intervene, mean_source_prompts, zero_ablation

HEAD = Head(1, 0)
TIMEOUT = 30.0


class WatchedLock:
    """A re-entrant lock that sets `waiting` whenever a thread has to wait for it."""

    def __init__(self, waiting: threading.Event) -> None:
        self._lock = threading.RLock()
        self.waiting = waiting

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        self.waiting.set()
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    def __enter__(self) -> WatchedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _run_threads(*targets: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
                errors.append(error)
        return run

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    if errors:
        raise errors[0]


def _while_intervening(model: Any, action: Callable[[], Any]) -> tuple[Any, bool]:
    """Thread A zero-ablates HEAD inside `intervene`; thread B runs `action` once A is inside.

    A stays inside until B waits for the lock or is done. Returns B's result and whether B was already
    done while A's hooks were attached.
    """
    go_on = threading.Event()  # B is blocked on the model's lock, or finished
    model.lock = WatchedLock(go_on)
    inside = threading.Event()
    out: dict[str, Any] = {}
    done = threading.Event()

    def thread_a() -> None:
        with intervene(model, zero_ablation([HEAD])):
            inside.set()
            assert go_on.wait(TIMEOUT), "thread B neither waited for the lock nor finished"
            out["b_done_inside"] = done.is_set()

    def thread_b() -> None:
        assert inside.wait(TIMEOUT)
        try:
            out["value"] = action()
        finally:
            done.set()
            go_on.set()

    _run_threads(thread_a, thread_b)
    assert active_hook_count(model) == 0
    return out["value"], out["b_done_inside"]


def _prompt(model: Any) -> torch.Tensor:
    return model.encode("the cat sat on the mat and the dog ran to the door")


def _z(model: Any, ids: torch.Tensor) -> torch.Tensor:
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n == f"blocks.{HEAD.layer}.attn.hook_z")
    return cache[f"blocks.{HEAD.layer}.attn.hook_z"][:, :, HEAD.head]


def _direct_effect(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from analyses.data.counterfactual import CounterfactualPrompt
    from analyses.factual import reference_direct_effect

    prompt = CounterfactualPrompt("x", ("y",), "z", model.decode(ids[0, 1:]), memorised_token=5,
                                  in_context_token=7, multi_token=False)
    return torch.tensor(reference_direct_effect(model, prompt, Head(1, 2)))


def _clean_log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from analyses.safety import clean_run

    return clean_run(model, ids).log_probs


# Each path a forward can take through the model: probe helpers, the bridge and HF model called directly,
# the LoadedModel methods, and analyzer code (safety's clean run, factual's hook-based reference).
PATHS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "head_means": lambda m, ids: head_means(m, mean_source_prompts(m), [HEAD])[HEAD],
    "capture_z": lambda m, ids: capture_z(m, ids, [HEAD])[HEAD],
    "bridge.run_with_cache": _z,
    "bridge()": lambda m, ids: m.bridge(ids),
    "hf_model()": lambda m, ids: m.hf_model(ids).logits,
    "bridge.run_with_hooks": lambda m, ids: m.bridge.run_with_hooks(ids, fwd_hooks=[]),
    "bridge.generate": lambda m, ids: m.bridge.generate(ids, max_new_tokens=3, do_sample=False, verbose=False,
                                                        return_type="tokens"),
    "model.run_with_cache": lambda m, ids: m.run_with_cache(ids)[1][f"blocks.{HEAD.layer}.attn.hook_z"],
    "model.logits": lambda m, ids: m.logits(ids),
    "safety.clean_run": _clean_log_probs,
    "factual.reference_direct_effect": _direct_effect,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_forward_waits_for_another_threads_intervention(tiny_gqa, path):
    model = tiny_gqa
    ids = _prompt(model)
    action = PATHS[path]
    alone = action(model, ids)
    if path == "head_means":
        assert float(alone.norm()) > 0.1
    seen, done_inside = _while_intervening(model, lambda: action(model, ids))
    assert torch.equal(seen, alone), (f"{path} beside an intervention: norm {float(seen.float().norm()):.4f}, "
                                      f"alone {float(alone.float().norm()):.4f}")
    assert not done_inside, f"{path} finished while another thread's hooks were attached"


def test_head_means_norm_alone_and_beside_an_intervention(tiny_gqa):
    """The numbers of the reliability issue: L1H0's mean norm is the same with another thread in `intervene`."""
    model = tiny_gqa
    prompts = mean_source_prompts(model)
    alone = float(head_means(model, prompts, [HEAD])[HEAD].norm())
    beside, _ = _while_intervening(model, lambda: float(head_means(model, prompts, [HEAD])[HEAD].norm()))
    assert alone > 0.1 and beside == pytest.approx(alone, abs=0), (alone, beside)


def test_hooks_from_another_thread_never_reach_a_locked_forward(tiny_gqa):
    """The other direction: B attaches its hooks (the bridge's `hooks`) while A holds the model between
    two forwards; A's second forward must be clean. B's own hook sets an event once it fires."""
    model = tiny_gqa
    ids = _prompt(model)
    clean = model.logits(ids)
    go_on, a_done, b_fired = threading.Event(), threading.Event(), threading.Event()
    model.lock = WatchedLock(go_on)
    holding = threading.Event()
    out: dict[str, torch.Tensor] = {}

    def zero_and_signal(z: torch.Tensor, hook: Any) -> torch.Tensor:
        b_fired.set()
        z = z.clone()
        z[:, :, HEAD.head] = 0.0
        return z

    def thread_a() -> None:
        with model.lock:
            out["first"] = model.logits(ids)
            holding.set()
            assert go_on.wait(TIMEOUT), "thread B neither waited for the lock nor attached its hooks"
            out["second"] = model.logits(ids)
            a_done.set()

    def thread_b() -> None:
        assert holding.wait(TIMEOUT)
        with model.bridge.hooks(fwd_hooks=[(f"blocks.{HEAD.layer}.attn.hook_z", zero_and_signal)]):
            go_on.set()  # the hooks are attached: A may run its second forward now
            assert a_done.wait(TIMEOUT)
            out["b"] = model.bridge(ids)

    _run_threads(thread_a, thread_b)
    assert torch.equal(out["first"], clean)
    assert torch.equal(out["second"], clean), (
        f"A's second forward ran under B's hooks: logits off by {float((out['second'] - clean).norm()):.4f}")
    assert b_fired.is_set() and not torch.equal(out["b"], clean)  # B's hook did write, in B's own forward
    assert active_hook_count(model) == 0


def test_nested_intervene_and_forward_in_one_thread(tiny_gqa):
    """The lock is re-entrant: a forward, `run_with_cache` and another `intervene` inside `intervene` work."""
    model = tiny_gqa
    ids = _prompt(model)
    with intervene(model, zero_ablation([HEAD])):
        assert float(capture_z(model, ids, [HEAD])[HEAD].abs().max()) == 0.0
        with intervene(model, zero_ablation([Head(0, 1)])):
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n == "blocks.0.attn.hook_z")
            assert float(cache["blocks.0.attn.hook_z"][:, :, 1].abs().max()) == 0.0
        with model.hooks([]):
            model.logits(ids)
    assert float(capture_z(model, ids, [HEAD])[HEAD].abs().max()) > 0.0


def test_permanent_hooks_need_the_lock(tiny_gqa):
    model = tiny_gqa
    with pytest.raises(ProbeError, match="model.lock"):
        model.bridge.add_hook("blocks.0.attn.hook_z", lambda z, hook: z)
    assert active_hook_count(model) == 0
    with model.lock:
        model.bridge.add_hook("blocks.0.attn.hook_z", lambda z, hook: z)
        assert active_hook_count(model) > 0
        model.bridge.reset_hooks()
    assert active_hook_count(model) == 0


# ---- two app sessions on the one cached model ---------------------------------------------------

def _playground_numbers(app: Any) -> dict[str, Any]:
    assert not app.exception, app.exception
    tables = [list(d.value["prob"]) for d in app.dataframe if "prob" in getattr(d.value, "columns", [])]
    metrics = {m.label: m.value for m in app.metric}
    return {"tables": tables, "tv": metrics["total variation distance"], "applied": app.markdown[0].value}


def test_two_app_sessions_do_not_corrupt_each_others_means(monkeypatch):
    """Session A zero-ablates L1H0 on the playground; session B mean-ablates L1H0 (it computes head means
    on the shared model). A is paused inside its intervention (a hook on the shared model waits) while B
    runs; A resumes only once B waits for the model's lock (or is done). B's numbers must equal B alone."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from app.state import cached_model

    monkeypatch.setenv("PROBE_APP_MODEL", "tiny-gqa")
    pages = Path(__file__).resolve().parents[2] / "app" / "views"

    def session(heads: str, action: str) -> Any:
        app = AppTest.from_file(str(pages / "playground.py"), default_timeout=120)
        app.session_state["model_spec"] = "tiny-gqa"
        app.run()
        app.number_input[0].set_value(0)  # no generation: the next-token numbers are enough
        app.radio[0].set_value(action)
        app.text_input(key="heads_text").set_value(heads)
        return app

    a_alone = _playground_numbers(session("L1H0", "zero ablation").run())
    b = session("L1H0", "mean ablation")
    b_alone = _playground_numbers(b.run())
    assert "mean-ablate L1H0" in b_alone["applied"] and "zero-ablate L1H0" in a_alone["applied"]
    assert b_alone["tv"] != a_alone["tv"]  # mean and zero ablation of L1H0 differ: a leak would show

    model = cached_model("tiny-gqa", None, "float32")  # the sessions' model (one per process)
    go_on, paused, b_done = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(model, "lock", WatchedLock(go_on))
    a_session = session("L1H0", "zero ablation")

    def pause(z: torch.Tensor, hook: Any) -> None:
        """In the first forward that runs under an intervention (session A's): wait for B."""
        if not paused.is_set() and active_hook_count(model) > out["baseline"]:
            paused.set()
            assert go_on.wait(TIMEOUT), "session B neither waited for the lock nor finished"
            out["b_done_inside"] = b_done.is_set()

    out: dict[str, Any] = {}
    with model.lock:
        model.bridge.add_hook("blocks.0.attn.hook_z", pause, is_permanent=True)
        out["baseline"] = active_hook_count(model)  # the pause hook alone
    try:
        def run_a() -> None:
            out["a"] = _playground_numbers(a_session.run())

        def run_b() -> None:
            assert paused.wait(TIMEOUT), "session A never reached its intervention"
            try:
                out["b"] = _playground_numbers(b.run())
            finally:
                b_done.set()
                go_on.set()

        _run_threads(run_a, run_b)
    finally:
        with model.lock:
            model.bridge.reset_hooks(including_permanent=True)
    assert paused.is_set() and not out["b_done_inside"]
    assert out["b"] == b_alone, (out["b"], b_alone)
    assert out["a"] == a_alone
