"""Model page: choose a spec, device and dtype; see the architecture facts."""

from __future__ import annotations

import streamlit as st

from app.state import DEFAULT_SPEC, current_model, sidebar, spec_choices
from probe.models import facts

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
