"""What every page of the Streamlit app shares: the cached model, the sidebar, inline errors.

The model is cached per process (`st.cache_resource`) and shared by sessions; it is never mutated:
interventions are hooks attached under the model's lock and removed after each run.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from analyses.specs import register_analysis_specs
from probe.errors import ProbeError
from probe.heads import Head, parse_heads
from probe.models import DEFAULT_MODEL, SPECS, LoadedModel, list_specs, load_model

register_analysis_specs()  # analyzer-built specs (the refusal organism) load by name in the app too

T = TypeVar("T")
DEFAULT_SPEC = os.environ.get("PROBE_APP_MODEL", DEFAULT_MODEL)


@st.cache_resource(show_spinner=False, max_entries=3)
def cached_model(spec: str, device: str | None, dtype: str) -> LoadedModel:
    return load_model(spec, device=device, dtype=dtype)


def spec_choices() -> list[str]:
    """Embedded specs first, then the tiny ones; free text (hf:/gguf:) is typed separately."""
    listed = [spec for spec, _ in list_specs()]
    return sorted((s.name for s in listed), key=lambda name: (not SPECS[name].embedded, name))


def guarded(action: Callable[[], T]) -> T | None:
    """Run `action`; a user mistake becomes an inline error, anything else an expandable traceback."""
    try:
        return action()
    except ProbeError as error:
        st.error(str(error))
    except Exception as error:  # noqa: BLE001 - the app must not die on an unexpected error
        st.error(f"Unexpected error: {error}")
        with st.expander("details"):
            st.code(traceback.format_exc())
    return None


def current_model() -> LoadedModel | None:
    """The model chosen on the Model page (or the default), loaded once per process."""
    spec = st.session_state.get("model_spec", DEFAULT_SPEC)
    device = st.session_state.get("device") or None
    dtype = st.session_state.get("dtype", "float32")
    with st.spinner(f"Loading {spec} (embedded models take 15-50 s the first time) ..."):
        return guarded(lambda: cached_model(spec, device, dtype))


def selected_heads() -> list[Head]:
    return list(st.session_state.get("selected_heads", []))


def set_selected_heads(heads: list[Head]) -> None:
    st.session_state["selected_heads"] = list(heads)
    st.session_state["heads_text"] = ", ".join(str(h) for h in heads)


def heads_from_text(text: str, model: LoadedModel) -> list[Head] | None:
    return guarded(lambda: parse_heads(text, model)) if text.strip() else []


def sidebar(model: Any) -> None:
    with st.sidebar:
        if model is not None:
            st.caption(model.shape_text)
        heads = selected_heads()
        st.caption("selected heads: " + (", ".join(map(str, heads)) if heads else "none"))
