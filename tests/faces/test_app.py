"""Streamlit AppTest: each page loads on the tiny model, reacts to one interaction, shows its numbers."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

os.environ["PROBE_APP_MODEL"] = "tiny-gqa"
PAGES = str(Path(__file__).resolve().parents[2] / "app" / "views")


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


# ---- analyzer pages on planted models: a cached run (recorded with the planted data) is picked and shown ----

@dataclass(frozen=True)
class PlantedPage:
    """One analyzer page's acceptance case: the planted model, a small run that works on it, what must show."""

    analyzer: str
    spec: str
    build: Callable[[], Any]
    compute: Callable[[Any, pytest.MonkeyPatch], tuple[Any, Any]]  # (model, monkeypatch) -> (config, result)
    data: str | None             # the custom inputs of the run, if any (joins the cache key)
    head: str                    # the planted head: first on the "Send top heads" button
    summary_parts: tuple[str, ...]  # text the stored summary must show
    n_figures: int


def _retrieval_run(model, monkeypatch):
    from analyses import planted, retrieval

    config = retrieval.RetrievalConfig(lengths=(80, 160), depths=(0.0, 100.0), needles=(0,), template="base",
                                       max_new_tokens=6, mask_ks=(1,), mask_random_draws=3,
                                       # one planted needle: masking in-sample, labelled so in the result
                                       mask_needles=(0,), mask_depths=(0.0, 100.0), mask_offset=0,
                                       allow_in_sample=True)
    return config, retrieval.run(model, config, needle_set=(planted.RETRIEVAL_NEEDLE,),
                                 sentences=planted.retrieval_sentences())


def _safety_run(model, monkeypatch):
    from analyses import safety
    from analyses.planted import SAFETY_HARMFUL_PROMPTS as harmful
    from analyses.planted import SAFETY_HARMLESS_PROMPTS as harmless

    config = safety.SafetyConfig(template="plain", attribution_prompts=harmful + harmless, n_ships_prompts=3,
                                 n_sahara_prompts=10, group_size=2, sahara_pool=4, eval_harmful=harmful,
                                 eval_harmless=harmless, max_new_tokens=2, random_draws=5, epsilon=0.0,
                                 judge_short=False, judge_phrases=("sorry",))
    return config, safety.run(model, config)


def _cdt_run(model, monkeypatch):
    import analyses.cdt as cdt

    config = cdt.CDTConfig(task="planted-induction", discovery_per_template=6, evaluation_per_template=8,
                           per_iteration=3, max_heads=6, min_relative=0.2, random_draws=3, baseline=True)
    return config, cdt.run(model, config)


def _factual_run(model, monkeypatch):
    from analyses import factual
    from analyses.planted import FACTUAL_TABLE

    config = factual.FactualConfig(table=FACTUAL_TABLE, n_tuning=16, n_heldout=16, candidates_per_direction=2,
                                   ablate_top_k=1, random_draws=3, factors=(-1.0, 0.0, 1.0, 2.0))
    return config, factual.run(model, config)


def _duo_run(model, monkeypatch):
    """The planted passkeys train the gates; an in-vocabulary needle and haystack evaluate NIAH."""
    from analyses import duo
    from analyses.data.needles import Needle
    from analyses.planted import DUO_WORDS, duo_samples

    needle = Needle(fact="the key is school book story", question="what is the key ?", answer="school book story")
    words = DUO_WORDS[3:]
    sentences = tuple(" ".join(words[(i + j) % len(words)] for j in range(6)) + " ." for i in range(40))
    config = duo.DuoConfig(sink=1, recent=4, steps=120, lr=0.05, reg_weight=0.05, max_seconds=120,
                           context_length=40, n_passkeys=1, passkey_words=2, eval_lengths=(60,), eval_depths=(50.0,),
                           eval_needles=(0,), random_draws=2, max_new_tokens=4, retrieval_fraction=0.25,
                           memory_context=1000)
    return config, duo.run(model, config, samples=duo_samples(model), needle_set=(needle,), sentences=sentences)


def _planted(name: str) -> Callable[[], Any]:
    from analyses import planted

    return getattr(planted, name)


PLANTED_PAGES = [
    PlantedPage("retrieval", "planted-retrieval", lambda: _planted("retrieval_model")(), _retrieval_run,
                "planted needle + filler sentences", "L0H2",
                ("4/4 samples retained", "heads > 0.1: 1 of 4", "top: L0H2 1.00",
                 "mask uniform k=1: none 100%, top 0%"), 8),
    PlantedPage("safety", "planted-refusal", lambda: _planted("safety_model")(), _safety_run, None, "L1H2",
                ("top Ships heads: L1H2", "Sahara: L1H2", "base ASR 0.00", "1 heads: ASR 1.00 (delta +1.00)"), 5),
    PlantedPage("duo", "planted-duo", lambda: _planted("duo_model")(), _duo_run,
                "planted passkeys + in-vocabulary needle", "L0H0",
                ("120 steps", "highest gates: L0KV0 0.9", "L0KV1 0.00", "3 streaming KV heads",
                 "1000 tokens: 75% saved"), 4),
    PlantedPage("factual", "planted-factual", lambda: _planted("factual_model")(), _factual_run, None, "L1H0",
                ("known capitals 8/8", "baseline: in-context 1.00", "top in-context heads: L1H0",
                 "top memory heads: L1H1"), 3),
    PlantedPage("cdt", "planted-induction", lambda: _planted("induction_model")(), _cdt_run, None, "L1H0",
                ("top-1 accuracy 1.00", "CD-T circuit (2 heads", "L1H0 | L0H0"), 3),
]


@pytest.fixture
def register_planted():
    """Register planted models as model specs for this test (the loader returns one cached instance)."""
    from probe import models

    added = []

    def register(case: PlantedPage) -> Any:
        built = functools.cache(case.build)
        models.register_spec(case.spec, f"planted {case.analyzer} model", lambda device, dtype: built(),
                             lambda: True)
        added.append(case.spec)
        return built()

    yield register
    for spec in added:
        models.REGISTERED_SPECS.pop(spec, None)


def _record_planted_run(case: PlantedPage, model: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from analyses.registry import ANALYZERS
    from analyses.scan import record_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine
    try:
        start = time.perf_counter()
        config, result = case.compute(model, monkeypatch)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return record_run(model, ANALYZERS[case.analyzer], config, int(getattr(config, "seed", 0)), result, seconds,
                      data=case.data)


@pytest.mark.parametrize("case", PLANTED_PAGES, ids=[c.analyzer for c in PLANTED_PAGES])
def test_analyzer_page_shows_a_cached_planted_run(case, tmp_path, monkeypatch, register_planted):
    """Each analyzer page on its planted model: pick the stored run, Load, see the planted head and numbers."""
    monkeypatch.setenv("PROBE_HOME", str(tmp_path))  # also proves the planted runs need no fetched assets
    model = register_planted(case)
    record = _record_planted_run(case, model, monkeypatch)
    assert record["model"] == model.fingerprint and record["top_heads"][0][0] == case.head

    app = AppTest.from_file(f"{PAGES}/analysis_{case.analyzer}.py", default_timeout=60)
    app.session_state["model_spec"] = case.spec
    app.run()
    assert not app.exception, app.exception
    assert any("Run the analysis" in i.value for i in app.info)  # nothing shown before a run is picked
    assert not app.get("plotly_chart")
    picker = app.selectbox(key=f"{case.analyzer}_cached_run")
    assert picker.label == "Cached runs for this model" and len(picker.options) == 1
    assert f"{record['seconds']:.1f} s" in picker.options[0]
    assert record["summary"].splitlines()[0][:40] in picker.options[0]
    if case.data:
        assert case.data in picker.options[0]

    picker.set_value(record["key"])
    app.button(key=f"{case.analyzer}_load").click().run()
    assert not app.exception, app.exception
    assert any("Loaded from cache" in s.value for s in app.success)
    shown = app.code[0].value
    assert shown == record["summary"]
    for part in case.summary_parts:
        assert part in shown, (part, shown)
    assert len(app.get("plotly_chart")) == case.n_figures
    send = [b for b in app.button if b.label.startswith("Send top heads")]
    assert len(send) == 1 and send[0].label.startswith(f"Send top heads to the playground ({case.head}")


def test_analyzer_page_without_cached_runs_says_so(tmp_path, monkeypatch, register_planted):
    """A run stored for the planted model is not offered on another model (the fingerprint differs)."""
    from analyses.registry import ANALYZERS
    from analyses.scan import cached_runs

    monkeypatch.setenv("PROBE_HOME", str(tmp_path))
    case = PLANTED_PAGES[0]
    planted = register_planted(case)
    record = _record_planted_run(case, planted, monkeypatch)
    assert [r["key"] for r in cached_runs(planted, ANALYZERS["retrieval"])] == [record["key"]]
    app = page("analysis_retrieval").run()  # tiny-gqa
    assert not app.exception, app.exception
    assert any("No cached runs of retrieval for this model yet" in i.value for i in app.info)
    assert not app.selectbox and not [b for b in app.button if b.label == "Load"]
    assert not app.get("plotly_chart")
    app.session_state["model_spec"] = case.spec
    app.run()
    assert len(app.selectbox(key="retrieval_cached_run").options) == 1
