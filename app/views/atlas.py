"""Head atlas: every cached analysis result for the current model, on one layer x head grid."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app.state import current_model, set_selected_heads, sidebar
from probe.heads import Head
from probe.results import HeadScores, ResultCache

st.title("Head atlas")
model = current_model()
sidebar(model)


def cached_scores(fingerprint: str) -> dict[str, HeadScores]:
    """The newest HeadScores of each analyzer cached for this model (results carry a `scores` entry)."""
    found: dict[str, HeadScores] = {}
    for entry in ResultCache().entries(fingerprint):
        result = entry["result"]
        if isinstance(result, dict) and isinstance(result.get("scores"), dict) and "units" in result["scores"]:
            found.setdefault(entry["provenance"]["analyzer"], HeadScores.from_json(result["scores"]))
    return found


if model is not None:
    scores = cached_scores(model.fingerprint)
    if not scores:
        st.info("No analysis results are cached for this model yet: run an analyzer page or `probe scan`.")
    else:
        name = st.selectbox("Analysis", sorted(scores))
        chosen = scores[name]
        figure = go.Figure(go.Heatmap(z=chosen.scores.numpy(), colorscale="Viridis",
                                      x=[f"H{h}" for h in range(chosen.n_heads)],
                                      y=[f"L{l}" for l in range(chosen.n_layers)], colorbar={"title": chosen.units}))
        figure.update_layout(title=f"{name}: {chosen.units}", yaxis={"autorange": "reversed"}, height=600)
        st.plotly_chart(figure, width="stretch")
        cols = st.columns(2)
        layer = cols[0].number_input("Layer", 0, model.n_layers - 1, 0)
        head = cols[1].number_input("Head", 0, model.n_heads - 1, 0)
        picked = Head(int(layer), int(head))
        st.dataframe(pd.DataFrame([(n, s[picked], s.units) for n, s in sorted(scores.items())],
                                  columns=["analysis", str(picked), "units"]))
        if st.button("Send top 5 heads of this analysis to the playground"):
            set_selected_heads([h for h, _ in chosen.top(5)])
            st.switch_page("views/playground.py")
