"""Model page: choose a spec, device and dtype; see the architecture facts; run the doctor on request."""

from __future__ import annotations

import streamlit as st

from analyses.doctor import DOCTOR_COLUMNS, DoctorResult, doctor, header_lines, table_rows, timing_line
from app.state import DEFAULT_SPEC, cached_model, current_model, guarded, sidebar, spec_choices
from probe.models import facts


@st.cache_data(show_spinner=False, max_entries=16)
def doctor_result(fingerprint: str, spec: str, device: str | None) -> DoctorResult:
    """The doctor's result for one model, cached by its fingerprint (the doctor checks in float32: a
    model loaded in another dtype is checked through its float32 load)."""
    return doctor(cached_model(spec, device, "float32"))

st.title("Model")
choices = spec_choices()
with st.form("model_form"):
    picked = st.selectbox("Model spec", choices, index=choices.index(DEFAULT_SPEC) if DEFAULT_SPEC in choices else 0)
    custom = st.text_input("...or a path / hub id", placeholder="hf:/path/to/folder  or  gguf:/path/to/model.gguf")
    device = st.selectbox("Device", ["auto", "cpu", "cuda"])
    dtype = st.selectbox("Dtype", ["float32", "bfloat16", "float16", "float64"])
    if st.form_submit_button("Load"):
        st.session_state["model_spec"] = custom.strip() or picked
        st.session_state["device"] = None if device == "auto" else device
        st.session_state["dtype"] = dtype

model = current_model()
sidebar(model)
if model is not None:
    info = facts(model)
    st.subheader(info["spec"])
    cols = st.columns(4)
    cols[0].metric("layers", info["n_layers"])
    cols[1].metric("query heads", info["n_heads"])
    cols[2].metric("key/value heads", info["n_kv_heads"])
    cols[3].metric("context", info["n_ctx"])
    st.table({"fact": list(info), "value": [str(v) for v in info.values()]})
    st.caption("Query head h reads key/value head h // group_size: "
               + ", ".join(f"H{h}->KV{model.kv_head_of(h)}" for h in range(model.n_heads)))

    st.subheader("Doctor")
    st.caption("Checks that probe reads this model right: logits against an independently loaded Hugging Face "
               "copy, left padding, head ablation, and each analyzer's fast path against its reference, at a "
               "reduced size (`probe doctor`; SmolLM2: about 40 s here on 2 free cores, see docs/doctor.md). Cached per model "
               "fingerprint.")
    shown = st.session_state.setdefault("doctor_shown", set())
    if st.button("Run doctor"):
        shown.add(model.fingerprint)
    if model.fingerprint in shown:
        with st.spinner(f"Running the doctor on {model.spec} ..."):
            result = guarded(lambda: doctor_result(model.fingerprint, model.spec, st.session_state.get("device") or None))
        if result is not None:
            for line in header_lines(result):
                st.text(line)
            rows = table_rows(result)
            st.table({column: [row[i] for row in rows] for i, column in enumerate(DOCTOR_COLUMNS)})
            summary = timing_line(result)
            if result.ok:
                skipped = [c.name for c in result.checks if c.passed is None]
                note = f"; skipped: {', '.join(skipped)} (see detail)" if skipped else ""
                st.success(f"doctor: all checks pass{note} ({summary})")
            else:
                failed = ", ".join(c.name for c in result.checks if c.passed is False)
                st.error(f"doctor: failed: {failed} ({summary})")
