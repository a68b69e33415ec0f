"""One page per analyzer, all drawn by `show(name)`: settings form, run (progress, cancellable) or load
from the cache, pick any stored run of this model (including runs recorded by notebooks or tests with
their own data), the analyzer's own figures, and its top heads sent to the playground in one click."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import streamlit as st

from analyses.registry import ANALYZERS, available, make_config
from analyses.scan import cached_runs, load_record, run_cached
from app.state import current_model, guarded, set_selected_heads, sidebar
from probe.errors import ProbeError
from probe.heads import Head


def _field_input(field: dataclasses.Field, value: Any, key: str) -> Any:
    label = field.name.replace("_", " ")
    if isinstance(value, bool):
        return st.checkbox(label, value=value, key=key)
    if isinstance(value, int):
        return int(st.number_input(label, value=value, step=1, key=key))
    if isinstance(value, float):
        return float(st.number_input(label, value=value, format="%g", key=key))
    if isinstance(value, tuple):
        text = st.text_input(label + " (JSON list)", value=json.dumps(list(value)), key=key)
        try:
            return tuple(json.loads(text))
        except (json.JSONDecodeError, TypeError) as error:
            raise ProbeError(f"{label}: {error}") from error
    return st.text_input(label, value=str(value), key=key)


def _run_label(record: dict[str, Any]) -> str:
    """Which stored run this is: when, how long it took, its data if custom, and how its summary starts."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("created", 0))))
    first = (record.get("summary") or "").strip().splitlines()
    start = first[0][:70] + ("..." if len(first[0]) > 70 else "") if first else "(no summary)"
    data = f"{record['data']} · " if record.get("data") else ""
    return f"{when} · {float(record.get('seconds', 0)):.1f} s · {data}{start}"


def _cached_run_picker(name: str, model: Any, state_key: str) -> None:
    """A selectbox of the stored runs of this analyzer on this model, and a Load button."""
    entry = ANALYZERS[name]
    runs = guarded(lambda: cached_runs(model, entry)) or []
    if not runs:
        st.info(f"No cached runs of {name} for this model yet.")
        return
    by_key = {record["key"]: record for record in runs}
    left, right = st.columns([4, 1])
    chosen = left.selectbox("Cached runs for this model", list(by_key), key=f"{name}_cached_run",
                            format_func=lambda key: _run_label(by_key[key]))
    right.write("")  # align the button with the selectbox
    if right.button("Load", key=f"{name}_load") and chosen in by_key:
        record = by_key[chosen]
        result = guarded(lambda: load_record(entry, record))
        if result is not None:
            st.session_state[state_key] = (model.fingerprint, result, record, True)


def show(name: str) -> None:
    entry = ANALYZERS[name]
    st.title(f"{name}: {entry.description}")
    model = current_model()
    sidebar(model)
    if model is None:
        return
    if name not in available():
        st.warning(f"The {name} analyzer is not part of this version of probe.")
        return
    preset = st.radio("Preset", ["quick", "default"], horizontal=True, key=f"{name}_preset",
                      help="quick: sized for a 2-core CPU; default: the paper-scale settings")
    base = guarded(lambda: make_config(entry, preset))
    if base is None:
        return
    with st.expander("Settings"):
        values = {}
        for field in dataclasses.fields(base):
            values[field.name] = guarded(lambda f=field: _field_input(f, getattr(base, f.name), f"{name}_{preset}_{f.name}"))
    config = guarded(lambda: dataclasses.replace(base, **{k: v for k, v in values.items() if v is not None}))
    if config is None:
        return
    seed = int(getattr(config, "seed", 0))
    left, right = st.columns(2)
    run = left.button("Run (or load the cached result)", type="primary", key=f"{name}_run")
    force = right.checkbox("recompute even if cached", key=f"{name}_force")
    st.caption("Cancel a running analysis with the Stop button at the top right (or any other click).")
    state_key = f"result_{name}"
    if run:
        bar = st.progress(0.0, text="starting ...")

        def progress(fraction: float, message: str) -> None:
            bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)

        outcome = guarded(lambda: run_cached(model, entry, config, seed, force=force, progress=progress))
        bar.empty()
        if outcome is not None:
            st.session_state[state_key] = (model.fingerprint, outcome[0], outcome[1], outcome[2])
    _cached_run_picker(name, model, state_key)
    stored = st.session_state.get(state_key)
    if not stored or stored[0] != model.fingerprint:
        st.info("Run the analysis (cached results load instantly).")
        return
    _, result, record, from_cache = stored
    st.success(f"{'Loaded from cache' if from_cache else 'Computed'} ({record['seconds']:.1f} s of compute).")
    st.code(record["summary"], language=None)
    top = [Head.parse(h) for h, _ in record["top_heads"][:5]]
    if st.button(f"Send top heads to the playground ({', '.join(map(str, top))})", key=f"{name}_send"):
        set_selected_heads(top)
        st.switch_page("views/playground.py")
    figures = guarded(lambda: entry.load().figures(result)) or {}
    for title, figure in figures.items():
        st.subheader(title)
        st.plotly_chart(figure, width="stretch", key=f"{name}_fig_{title}")
