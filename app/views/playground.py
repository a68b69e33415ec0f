"""Intervention playground: ablate or scale heads; original vs intervened, side by side."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.state import current_model, guarded, heads_from_text, set_selected_heads, sidebar
from probe.effects import intervention_effects
from probe.heads import Head
from probe.interventions import ablation, head_means, mean_source_prompts, scale

st.title("Intervention playground")
model = current_model()
if model is not None:
    prompt = st.text_input("Prompt", value="The capital of France is", key="pg_prompt")
    st.session_state.setdefault("heads_text", "")
    text = st.text_input("Heads (e.g. L5H3, 2.1, L0H*)", key="heads_text")
    heads = heads_from_text(text, model)

    with st.expander("...or click heads in the layer x head grid"):
        grid = pd.DataFrame(False, index=[f"L{l}" for l in range(model.n_layers)],
                            columns=[f"H{h}" for h in range(model.n_heads)])
        for chosen in heads or []:
            grid.iloc[chosen.layer, chosen.head] = True
        edited = st.data_editor(grid, key="head_grid")
        clicked = [Head(l, h) for l in range(model.n_layers) for h in range(model.n_heads) if edited.iloc[l, h]]
        if st.button("Use the grid selection"):
            set_selected_heads(clicked)
            st.rerun()

    action = st.radio("Intervention", ["zero ablation", "mean ablation", "uniform attention",
                                       "scale query", "scale value", "scale output"], horizontal=True)
    factor = st.slider("Scale factor", -3.0, 3.0, 0.0, 0.1, disabled=not action.startswith("scale"))
    target = st.text_input("Target token to track (optional)", value=" Paris")
    generate = st.number_input("Generate tokens", 0, 64, 8)

    def run():
        if not heads:
            return intervention_effects(model, prompt, [], top_k=10, generate=int(generate))
        if action.startswith("scale"):
            interventions = [scale(heads, action.split()[1], factor)]
        else:
            method = action.split()[0]
            means = head_means(model, mean_source_prompts(model), heads) if method == "mean" else None
            interventions = [ablation(heads, method, means)]
        return intervention_effects(model, prompt, interventions, top_k=10, generate=int(generate))

    result = guarded(run) if heads is not None else None
    if result is not None:
        st.session_state["selected_heads"] = heads
        st.write("Applied: " + ("; ".join(result.interventions) or "nothing (choose heads)"))
        left, right = st.columns(2)
        for column, side, label in ((left, result.original, "original"), (right, result.intervened, "intervened")):
            with column:
                st.subheader(label)
                # repr: a leading space, a newline or an empty-looking token stays visible in the table
                st.dataframe(pd.DataFrame([(repr(t.token), round(t.prob, 4)) for t in side.top],
                                          columns=["token", "prob"]),
                             key=f"table_{label}")
                if side.generation is not None:
                    st.code(prompt + side.generation, language=None)
        st.metric("total variation distance", f"{result.total_variation:.4f}")
        if target:
            ids = model.tokenizer(target, add_special_tokens=False).input_ids
            if ids:
                before, after = result.prob_of(ids[0])
                st.metric(f"p({model.decode([ids[0]])!r})", f"{after:.4f}", f"{after - before:+.4f}")
                figure = go.Figure(go.Bar(x=["original", "intervened"], y=[before, after],
                                          text=[f"{before:.4f}", f"{after:.4f}"], textposition="outside"))
                figure.update_layout(height=280, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                                     title=f"p({model.decode([ids[0]])!r}) at the next position",
                                     yaxis_title="probability", yaxis_range=[0, max(before, after) * 1.2 + 1e-6])
                st.plotly_chart(figure, width="stretch")
sidebar(model)
