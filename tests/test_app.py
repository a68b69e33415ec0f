"""Streamlit AppTest: each page loads on the tiny model, reacts to one interaction, shows its numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

os.environ["PROBE_APP_MODEL"] = "tiny-gqa"
PAGES = str(Path(__file__).resolve().parent.parent / "app" / "views")


def page(name: str) -> AppTest:
    app = AppTest.from_file(f"{PAGES}/{name}.py", default_timeout=120)
    app.session_state["model_spec"] = "tiny-gqa"
    return app


def test_model_page_shows_the_facts():
    app = page("model").run()
    assert not app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["layers"] == "2" and metrics["query heads"] == "4" and metrics["key/value heads"] == "2"


def test_model_page_bad_path_is_an_inline_error():
    app = page("model").run()
    app.text_input[0].set_value("gguf:/nowhere/model.gguf")
    app.button[0].click().run()
    assert not app.exception
    assert any("does not exist" in e.value for e in app.error)


def test_attention_page_pattern_and_readouts():
    app = page("attention").run()
    assert not app.exception
    assert len(app.get("plotly_chart")) == 2
    app.number_input[1].set_value(3).run()
    assert not app.exception and len(app.dataframe) == 1


def test_attention_page_over_long_prompt_is_an_inline_error():
    app = page("attention").run()
    app.text_input[0].set_value("one " * 300).run()
    assert any("context of 256" in e.value for e in app.error)


def _table_probs(app: AppTest, key: str) -> list[float]:
    tables = [d.value for d in app.dataframe if "prob" in getattr(d.value, "columns", [])]
    assert len(tables) == 2, "expected the original and the intervened table"
    return list(tables[0 if key == "table_original" else 1]["prob"])


def test_playground_ablation_changes_the_probabilities():
    app = page("playground").run()
    assert not app.exception
    app.text_input(key="heads_text").set_value("L1H0, L1H1").run()
    assert not app.exception
    assert "zero-ablate L1H0, L1H1" in app.markdown[0].value
    assert _table_probs(app, "table_original") != _table_probs(app, "table_intervened")


def test_playground_head_out_of_range_is_an_inline_error():
    app = page("playground").run()
    app.text_input(key="heads_text").set_value("L9H0").run()
    assert any("2 layers" in e.value for e in app.error)


def test_sessions_do_not_share_interventions():
    a, b = page("playground").run(), page("playground").run()
    a.text_input(key="heads_text").set_value("L0H*, L1H*").run()
    b.run()
    assert _table_probs(b, "table_original") == _table_probs(b, "table_intervened")
    assert _table_probs(a, "table_original") != _table_probs(a, "table_intervened")


def test_atlas_reads_cached_results(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBE_HOME", str(tmp_path))
    from probe.models import load_model
    from probe.results import HeadScores, Provenance, ResultCache

    model = load_model("tiny-gqa")
    empty = page("atlas").run()
    assert any("No analysis results" in i.value for i in empty.info)
    prov = Provenance("tiny-gqa", model.fingerprint, "retrieval", "1", {}, "d", 0)
    scores = HeadScores("retrieval", "copy share", torch.arange(8.0).reshape(2, 4), prov)
    ResultCache().put(prov, {"scores": scores.to_json()})
    app = page("atlas").run()
    assert not app.exception
    assert len(app.get("plotly_chart")) == 1
    assert "retrieval" in app.selectbox[0].options


def test_analyzer_page_runs_caches_and_sends_heads(tmp_path, monkeypatch):
    """The successor page on the tiny model: run with progress, load from cache on rerun, send heads."""
    monkeypatch.setenv("PROBE_HOME", str(tmp_path))
    app = page("analysis_successor").run()
    assert not app.exception
    assert any("Run the analysis" in i.value for i in app.info)
    run = [b for b in app.button if b.label.startswith("Run")][0]
    run.click().run(timeout=300)
    assert not app.exception, app.exception
    assert any("Computed" in s.value for s in app.success)
    assert len(app.get("plotly_chart")) >= 2
    again = page("analysis_successor").run()
    [b for b in again.button if b.label.startswith("Run")][0].click().run(timeout=300)
    assert any("Loaded from cache" in s.value for s in again.success)
    send = [b for b in again.button if b.label.startswith("Send top heads")][0]
    assert "L" in send.label
