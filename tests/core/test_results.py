"""HeadScores and provenance round-trip through JSON; the cache is keyed by provenance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_atomic_write_removes_its_temp_file_when_serialisation_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"a": 1})

    def fail_half_way(obj, handle, **kwargs):
        handle.write('{"half": ')
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dump", fail_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        write_json_atomic(target, {"a": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert json.loads(target.read_text()) == {"a": 1}


KILLED_WRITER = """
import json, os, signal, sys
from pathlib import Path
from probe import results

def die_half_way(obj, handle, **kwargs):
    handle.write('{"half": ')
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

json.dump = die_half_way
results.write_json_atomic(Path(sys.argv[1]), {"a": 2})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"a": 1})
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name != "results.json"]
    assert len(left) == 1 and left[0].startswith(".results.json.")  # a kill runs no cleanup
    assert json.loads(target.read_text()) == {"a": 1}  # the finished file is untouched
    write_json_atomic(target, {"a": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert json.loads(target.read_text()) == {"a": 3}


def test_live_writers_temp_files_are_left_alone(tmp_path):
    from probe.files import _writer_tag, remove_orphan_temps

    target = tmp_path / "x.json"
    mine = tmp_path / f".x.json.{_writer_tag()}.abcdefgh.tmp"
    elsewhere = tmp_path / ".x.json.otherhost-1.abcdefgh.tmp"  # another machine's writer: cannot tell, keep
    for temp in (mine, elsewhere):
        temp.write_text("{")
    assert remove_orphan_temps(target) == []
    old = time.time() - 2 * 3600
    os.utime(elsewhere, (old, old))  # no write lasts hours: an orphan whoever wrote it
    assert remove_orphan_temps(target) == [elsewhere]


def test_corrupt_cache_entry_is_a_miss_set_aside_with_a_warning(tmp_path):
    from probe.files import CorruptFileWarning

    cache = ResultCache(tmp_path)
    path = cache.put(_prov(), {"value": 1})
    cache.put(_prov(analyzer="successor"), {"value": 2})
    path.write_text(path.read_text()[:30])
    with pytest.warns(CorruptFileWarning, match="retrieval"):
        assert cache.get(_prov()) is None
    assert [p.name.split(".corrupt-")[0] for p in path.parent.glob("*.corrupt-*")] == [path.name]
    cache.put(_prov(), {"value": 3})
    assert cache.get(_prov())["result"] == {"value": 3}
    (tmp_path / "successor").joinpath("junk.json").write_text("[]")
    reported = []
    entries = ResultCache(tmp_path, on_corrupt=lambda path, kept, why: reported.append(path.name)).entries()
    assert sorted(e["result"]["value"] for e in entries) == [2, 3] and reported == ["junk.json"]
