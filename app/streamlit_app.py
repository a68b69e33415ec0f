"""The probe Streamlit app: `streamlit run app/streamlit_app.py` (or `make app`)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `app.*` importable under streamlit run

PAGES = Path(__file__).parent / "views"  # not "pages/": Streamlit would list that folder itself

st.set_page_config(page_title="probe", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "model.py", title="Model", default=True),
    st.Page(PAGES / "attention.py", title="Attention explorer"),
    st.Page(PAGES / "playground.py", title="Intervention playground"),
    st.Page(PAGES / "atlas.py", title="Head atlas"),
    *[st.Page(PAGES / f"analysis_{name}.py", title=title) for name, title in (
        ("retrieval", "Retrieval heads"), ("duo", "DuoAttention gates"), ("successor", "Successor heads"),
        ("safety", "Safety heads"), ("factual", "Factual-recall heads"), ("cdt", "CD-T circuits"))],
])
navigation.run()
