"""Attention explorer: a head's pattern over the prompt, its top promoted tokens, the logit lens."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analyses.explore import head_top_tokens, lens_figure, logit_lens, pattern_figure, view_prompt
from app.state import current_model, guarded, sidebar

st.title("Attention explorer")
model = current_model()
sidebar(model)
if model is not None:
    prompt = st.text_input("Prompt", value="When Mary and John went to the store, John gave a drink to")
    cols = st.columns(2)
    layer = cols[0].number_input("Layer", min_value=0, max_value=model.n_layers - 1, value=min(1, model.n_layers - 1))
    head = cols[1].number_input("Head", min_value=0, max_value=model.n_heads - 1, value=0)
    view = guarded(lambda: view_prompt(model, prompt, int(layer)))
    if view is not None:
        st.plotly_chart(pattern_figure(view, int(head)), width="stretch")
        left, right = st.columns(2)
        with left:
            st.subheader(f"L{layer}H{head}: top promoted tokens")
            st.caption("direct logit attribution at the last position, final-norm scale frozen")
            st.dataframe(pd.DataFrame(head_top_tokens(model, view, int(head)), columns=["token", "logit"]))
        with right:
            st.subheader("Logit lens")
            st.plotly_chart(lens_figure(logit_lens(model, view)), width="stretch")
