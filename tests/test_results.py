"""HeadScores and provenance round-trip through JSON; the cache is keyed by provenance."""

from __future__ import annotations

import json

import pytest
import torch

from probe.heads import Head
from probe.results import HeadScores, Provenance, ResultCache, write_json_atomic


def _prov(**change):
    fields = dict(model_spec="tiny-llama", model_fingerprint="abc", analyzer="retrieval", analyzer_version="1",
                  config={"k": 3}, data_hash="d", seed=0)
    fields.update(change)
    return Provenance(**fields)


def test_head_scores_round_trip_and_ranking():
    scores = torch.tensor([[0.1, 0.9], [float("nan"), 0.5]])
    hs = HeadScores("retrieval", "copy share", scores, _prov(), "test")
    again = HeadScores.from_json(json.loads(json.dumps(hs.to_json())))
    assert again.name == "retrieval" and again.provenance == hs.provenance
    assert torch.equal(torch.isnan(again.scores), torch.isnan(scores.double()))
    assert [h for h, _ in again.top(3)] == [Head(0, 1), Head(1, 1), Head(0, 0)]
    assert again[Head(0, 1)] == pytest.approx(0.9)
    assert [h for h, _ in again.above(0.4)] == [Head(0, 1), Head(1, 1)]


def test_provenance_key_ignores_time_but_not_config():
    a, b = _prov(created="2026-01-01"), _prov(created="2026-02-02")
    assert a.key == b.key
    assert a.key != _prov(config={"k": 4}).key
    assert a.key != _prov(seed=1).key


def test_cache_put_get(tmp_path):
    cache = ResultCache(tmp_path)
    prov = _prov()
    assert cache.get(prov) is None
    path = cache.put(prov, {"value": 1})
    assert path.parent.name == "retrieval"
    assert cache.get(_prov(created="later"))["result"] == {"value": 1}
    assert [e["result"] for e in cache.entries("abc")] == [{"value": 1}]
    assert list(cache.entries("other")) == []


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    try:
        write_json_atomic(target, {"bad": object()})
    except TypeError:
        pass
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
