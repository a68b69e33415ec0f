"""Models over several devices (accelerate's device_map), with CPU and disk offload, on this CPU machine.

A tiny model whose last decoder layer and unembedding sit on "disk" (parameters on `meta` until a
module runs) gives the single-device logits, fingerprint, architecture-layer weights, interventions and
analyzer scores; docs/results/offload_agreement.json (tools/scale_agreement.py) holds every analyzer's
largest difference and docs/SCALE.md shows it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from families import build_folder

from analyses import planted, safety
from analyses.registry import ANALYZERS
from probe.architecture import architecture
from probe.errors import ProbeError
from probe.heads import Head
from probe.interventions import head_means, intervene, mean_ablation, mean_source_prompts, zero_ablation
from probe.models import converted, facts, load_model, parse_device_map, parse_max_memory
from probe.placement import _check_not_mixed
from tools import scale_agreement

ROOT = Path(__file__).resolve().parents[2]
TINY_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "disk"}
TEXT = "the capital city of the country is a secret number 12 and the key to the park is 13"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    one = load_model("tiny-llama", device="cpu")
    split = load_model("tiny-llama", device_map=TINY_MAP, offload_folder=str(folder))
    return one, split, folder


def test_disk_offloaded_model_reads_and_runs_as_on_one_device(pair):
    one, split, folder = pair
    assert split.offloaded and not one.offloaded
    assert any(p.device.type == "meta" for p in split.hf_model.parameters())  # offloaded until used
    assert any(folder.iterdir())                                              # the weights went to disk
    assert split.fingerprint == one.fingerprint                               # where they are is no part of it
    assert facts(split)["device_map"] == {"cpu": ["model.embed_tokens", "model.layers.0", "model.norm",
                                                  "model.rotary_emb"], "disk": ["model.layers.1", "lm_head"]}
    assert facts(one)["device_map"] is None and "offloaded" in split.fused_reason()
    ids = one.encode(TEXT)
    torch.testing.assert_close(split.logits(ids), one.logits(ids), atol=1e-5, rtol=0)
    a, b = architecture(one), architecture(split)
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_E", "unembed_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert getattr(b, "W_Q").device.type == "cpu"
    for layer in range(one.n_layers):
        assert torch.equal(a.norm("ln1", layer).weight, b.norm("ln1", layer).weight)
    assert torch.equal(a.final_norm.weight, b.final_norm.weight)
    for layer in range(one.n_layers):  # CD-T's MLP tables (Mlp.dense_weights), layer 1 read from disk
        mine, theirs = a.mlp(layer).dense_weights(), b.mlp(layer).dense_weights()
        assert all(torch.equal(getattr(mine, k), getattr(theirs, k)) for k in ("W_in", "W_gate", "W_out"))
    assert any(p.device.type == "meta" for p in split.hf_model.parameters())  # reading put them back


def test_interventions_on_the_offloaded_model_equal_one_device(pair):
    one, split, _ = pair
    ids = one.encode(TEXT)
    heads = [Head(1, 2), Head(0, 1)]
    results = []
    for model in (one, split):
        means = head_means(model, mean_source_prompts(model)[:3], heads)
        with intervene(model, [zero_ablation([Head(1, 0)]), mean_ablation(heads, means)]):
            results.append(model.logits(ids))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    assert not torch.allclose(results[0], one.logits(ids), atol=1e-3)  # the interventions did something


def test_an_analyzer_on_a_converted_offloaded_planted_model_equals_one_device(tmp_path):
    model = planted.safety_model()
    split = converted(model, device_map=scale_agreement.split_map(model), offload_folder=str(tmp_path))
    assert split.offloaded and split.fingerprint == model.fingerprint
    ids = model.encode(planted.SAFETY_HARMFUL_PROMPTS[0])
    a = safety.ships_query(model, ids, "query", 0.0)
    b = safety.ships_query(split, split.encode(planted.SAFETY_HARMFUL_PROMPTS[0]), "query", 0.0)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert int(b.argmax()) == planted.SAFETY_HEAD.layer * model.n_heads + planted.SAFETY_HEAD.head


def test_a_users_folder_loads_with_a_device_map_and_auto(tmp_path):
    folder = build_folder("llama", tmp_path / "models")
    one = load_model(f"hf:{folder}", device="cpu")
    mapping = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
               "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = load_model(f"hf:{folder}", device_map=mapping, offload_folder=str(tmp_path / "off"))
    ids = one.encode(TEXT)
    assert split.offloaded and split.fingerprint == one.fingerprint
    torch.testing.assert_close(split.logits(ids), one.logits(ids), atol=1e-5, rtol=0)
    auto = load_model("tiny-gqa", device_map="auto", max_memory={"cpu": "4GiB"})
    assert auto.device_map and not auto.offloaded and auto.device == "cpu"


def test_placement_errors_are_one_line_probe_errors(tmp_path):
    with pytest.raises(ProbeError, match="exclude each other"):
        load_model("tiny-llama", device="cpu", device_map="auto")
    with pytest.raises(ProbeError, match="only apply with --device-map"):
        load_model("tiny-llama", max_memory={"cpu": "1GiB"})
    with pytest.raises(ProbeError, match="Cannot place the model"):
        load_model("tiny-llama", device_map={"model.embed_tokens": "cpu"})  # most modules unmapped
    with pytest.raises(ProbeError, match="CUDA is not available"):
        load_model("tiny-llama", device_map={"": 0})
    _check_not_mixed([0, 1], "m")  # GPUs only, or cpu/disk only, bridge; a mix is refused before loading
    _check_not_mixed(["cpu", "disk"], "m")
    with pytest.raises(ProbeError, match="some on cpu/disk"):
        _check_not_mixed([0, "cuda:1", "disk"], "m")


def test_device_map_and_max_memory_flags_parse(tmp_path):
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map('{"model.layers.0": "cpu", "lm_head": "disk"}') == {"model.layers.0": "cpu",
                                                                                "lm_head": "disk"}
    file = tmp_path / "map.json"
    file.write_text(json.dumps(TINY_MAP))
    assert parse_device_map(str(file)) == TINY_MAP
    for bad, message in (("everywhere", "not one of auto"), ("{nope", "not valid JSON"), ("[]", "no such file"),
                         ('{"a": "tpu"}', "Unknown device"), ('{"a": true}', "a device is an index")):
        with pytest.raises(ProbeError, match=message):
            parse_device_map(bad)
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cpu=1000000") == {"cpu": 1000000} and parse_max_memory("") is None
    for bad in ("20GiB", "gpu=1GiB", "cpu=lots"):
        with pytest.raises(ProbeError, match="--max-memory"):
            parse_max_memory(bad)


# ---- the committed numbers ---------------------------------------------------------------------------


def test_offload_agreement_file_covers_every_analyzer_and_the_doc_shows_it():
    data = json.loads((ROOT / "docs/results/offload_agreement.json").read_text())
    assert data["command"] == scale_agreement.COMMAND
    rows = scale_agreement.doc_rows((ROOT / "docs/SCALE.md").read_text(), "## Offload")
    assert set(data["analyzers"]) == set(ANALYZERS) == set(rows)
    for name, entry in data["analyzers"].items():
        assert entry["max_abs_diff"] <= 1e-4 * max(1.0, entry["max_abs_reference"]), name
        assert entry["planted_rank"] == entry["planted_rank_reference"] == 1.0, name
        assert entry["on_disk"], name
        assert rows[name][1] == f"{entry['max_abs_diff']:.2g}", name
        assert rows[name][2] == f"{entry['planted_rank_reference']:g} / {entry['planted_rank']:g}", name
    assert re.search(re.escape(scale_agreement.COMMAND), (ROOT / "docs/SCALE.md").read_text())
