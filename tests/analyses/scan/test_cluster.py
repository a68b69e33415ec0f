"""Scans on Ray (analyses.cluster, probe.parallel) against the serial scan, on one local cluster.

One cluster for the module (`ray.init(num_cpus=2)`: start-up costs seconds). Its workers get their own
PROBE_HOME (assets linked from the real one), and the serial references run under another, so no
result can come from a run cache the other side wrote. Both sides run with 1 torch thread.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the cluster extra: pip install -e '.[test,cluster]'")

from analyses import retrieval, safety  # noqa: E402
from analyses.cluster import Job, Plan, read_plan, run_jobs  # noqa: E402
from analyses.planted import RETRIEVAL_NEEDLE, SAFETY_HARMFUL_PROMPTS, retrieval_sentences  # noqa: E402
from analyses.registry import ANALYZERS  # noqa: E402
from analyses.scan import ScanSettings, run_scan  # noqa: E402
from app.cli import main  # noqa: E402
from probe import assets  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.models import load_model  # noqa: E402
from probe.parallel import ModelSource, RayMapper, SerialMapper, using  # noqa: E402

MODELS = ("tiny-llama", "tiny-gpt2")
ANALYSES = ("successor", "safety")
SMALL = {  # seconds per job on the tiny models
    "successor": {"number_max": 20, "run_probe": False, "run_arithmetic": False, "run_causal": False},
    "safety": {"template": "plain", "n_ships_prompts": 2, "n_sahara_prompts": 2, "group_size": 2,
               "sahara_pool": 4, "validate": False},
}
TIMING = {"seconds", "created", "timings"}  # the only fields a rerun may change


def _home(root: Path) -> Path:
    """A PROBE_HOME with its own runs/ and the real fetched assets (StrongREJECT for safety)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "assets").symlink_to(assets.probe_home() / "assets", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = _home(tmp_path_factory.mktemp("ray_home") / "home")
    previous = os.environ.get("PROBE_HOME")
    os.environ["PROBE_HOME"] = str(home)  # the workers inherit the driver's environment at start-up
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PROBE_HOME", None)
        else:
            os.environ["PROBE_HOME"] = previous


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The serial scans of the plan's cells (in this process, 1 thread, their own PROBE_HOME)."""
    home = _home(tmp_path_factory.mktemp("serial_home") / "home")
    previous = os.environ.get("PROBE_HOME")
    os.environ["PROBE_HOME"] = str(home)
    torch.set_num_threads(1)
    try:
        documents = {}
        for spec in MODELS:
            model = load_model(spec, device="cpu")
            documents[spec] = run_scan(model, [ANALYZERS[a] for a in ANALYSES],
                                       ScanSettings(analyses=list(ANALYSES), overrides=SMALL),
                                       tmp_path_factory.mktemp("serial") / spec)
        return documents
    finally:
        if previous is None:
            os.environ.pop("PROBE_HOME", None)
        else:
            os.environ["PROBE_HOME"] = previous


def _plan() -> Plan:
    return Plan(models=MODELS, analyses=ANALYSES, device="cpu", threads=1, variants={"base": SMALL})


def untimed(value: Any) -> Any:
    """`value` without timing fields, at any depth (what may differ between two equal runs); NaN as "nan"."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # NaN != NaN: compared as a marker
    return value


@pytest.mark.asset("strongreject")  # safety's prompts
def test_plan_of_two_models_by_two_analyses_equals_the_serial_scans(cluster, serial, tmp_path):
    plan = _plan()
    events: list[tuple[str, str, dict]] = []
    documents = run_jobs(plan.jobs(), tmp_path, on_event=lambda kind, name, payload: events.append((kind, name, payload)))
    assert sum(kind == "done" for kind, _, _ in events) == 4, [e for e in events if e[0] == "error"]
    for spec in MODELS:
        document = documents[plan.folder(spec, 0, "base")]
        reference = serial[spec]
        assert set(document["analyses"]) == set(ANALYSES) and not document["errors"]
        assert document["model"] == reference["model"]
        for name in ANALYSES:
            ours, theirs = document["analyses"][name], reference["analyses"][name]
            assert ours["key"] == theirs["key"]
            assert untimed(ours) == untimed(theirs), f"{spec}/{name} differs from the serial scan"
        folder = tmp_path / plan.folder(spec, 0, "base")
        assert (folder / "results" / "safety.json").is_file() and (folder / "report.html").is_file()
    # the rerun skips every finished job: no task runs
    again: list[str] = []
    run_jobs(plan.jobs(), tmp_path, on_event=lambda kind, name, payload: again.append(kind))
    assert again.count("skip") == 4 and "start" not in again


def _running_tasks(name: str) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{name}"):
            found.append(process.info["pid"])
    return found


@pytest.mark.asset("strongreject")  # safety's prompts
def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost(cluster, serial, tmp_path):
    plan = Plan(models=MODELS[:1], analyses=ANALYSES, device="cpu", threads=1, variants={"base": SMALL})
    jobs = [Job(job.source, job.analysis, job.folder, job.preset, job.seed, job.overrides, job.threads)
            for job in plan.jobs()]
    events: list[tuple[str, str, float]] = []
    outcome: dict[str, Any] = {}

    def drive() -> None:
        outcome["documents"] = run_jobs(jobs, tmp_path, force=True,  # force: the workers' run cache has them
                                        on_event=lambda kind, name, payload: events.append((kind, name, time.time())))

    driver = threading.Thread(target=drive)
    driver.start()
    killed, deadline = None, time.time() + 120
    while killed is None and driver.is_alive() and time.time() < deadline:
        running = _running_tasks("run_job")
        if running:
            killed = running[0]
            os.kill(killed, signal.SIGKILL)  # the worker process dies mid-task
            killed_at = time.time()
        time.sleep(0.02)
    driver.join(timeout=300)
    assert killed is not None, "no run_job task was seen running"
    document = outcome["documents"][plan.folder(MODELS[0], 0, "base")]
    assert not document["errors"] and set(document["analyses"]) == set(ANALYSES)
    assert any(kind == "done" and at > killed_at for kind, _, at in events)  # finished after the kill
    for name in ANALYSES:
        assert untimed(document["analyses"][name]) == untimed(serial[MODELS[0]]["analyses"][name])
        assert (tmp_path / plan.folder(MODELS[0], 0, "base") / "results" / f"{name}.json").is_file()


def test_sharded_retrieval_equals_the_serial_run(cluster):
    source = ModelSource("planted-retrieval", factory="analyses.planted:retrieval_model")
    model = source.load()
    config = retrieval.RetrievalConfig(lengths=(80, 160), depths=(0.0, 50.0, 100.0), needles=(0,), template="base",
                                       max_new_tokens=6, haystack_stride=40)
    needles, sentences = (RETRIEVAL_NEEDLE,) * 6, retrieval_sentences(count=260)
    torch.set_num_threads(1)
    with using(SerialMapper()):
        serial_result = retrieval.run(model, config, needle_set=needles, sentences=sentences)
    with RayMapper(source, n_actors=2, threads=1) as mapper, using(mapper):
        sharded = retrieval.run(model, config, needle_set=needles, sentences=sentences)
        # the actors hold the planted weights: a caller with other weights is refused, nothing is sent
        with pytest.raises(ProbeError, match="same weights"):
            mapper.map(load_model("tiny-gqa", device="cpu"), _echo, [1, 2])
    assert sum(mapper.items_per_actor) == 6 and min(mapper.items_per_actor) >= 1  # both actors scored samples
    assert untimed(sharded.to_json()) == untimed(serial_result.to_json())
    assert torch.equal(sharded.per_sample["events"], serial_result.per_sample["events"])


def _echo(model: Any, item: int) -> int:
    return item


def _ships_and_sahara(model: Any, prompts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
    """Ships of every head per prompt and a 2-step Sahara, in batches of 3 rows: the 8 heads (2 layers) cut
    into [L0 L0 L0] [L0 L1 L1] [L1 L1], so a batch can start at one layer and hold rows of the next."""
    ships = [safety.ships_query(model, ids, "query", 1e-5, batch_rows=3) for ids in prompts]
    return ships, safety.sahara(model, prompts, size=2, ablation="output", batch_rows=3)


def test_sharded_ships_and_sahara_equal_the_serial_run(cluster):
    """Ships' (and Sahara's) planned read-out batches spread over 2 actors merge to the serial bits."""
    source = ModelSource("tiny-planted-refusal", factory="analyses.planted:safety_model")
    model = source.load()
    prompts = [model.encode(p) for p in SAFETY_HARMFUL_PROMPTS[:2]]
    torch.set_num_threads(1)
    with using(SerialMapper()):
        serial_ships, serial_steps = _ships_and_sahara(model, prompts)
    with RayMapper(source, n_actors=2, threads=1) as mapper, using(mapper):
        ships, steps = _ships_and_sahara(model, prompts)
    # per prompt: Ships 3 batches; Sahara step 1 (8 groups) 3, step 2 (7 groups) 3; 2 actors share each map
    assert sum(mapper.items_per_actor) == 2 * (3 + 3 + 3) and min(mapper.items_per_actor) >= 6
    for ours, theirs in zip(ships, serial_ships):
        assert torch.equal(ours, theirs)  # bit for bit (same thread count, same batches)
    assert [(s.head, s.score, s.candidate_scores) for s in steps] == \
        [(s.head, s.score, s.candidate_scores) for s in serial_steps]
    assert serial_ships[0].nan_to_num(-1).argmax() == 1 * model.n_heads + 2  # the planted L1H2 leads


def test_sharded_cdt_sweep_equals_the_serial_sweep(cluster):
    """CD-T's source layers over 2 actors (each rebuilds the clean pass of a batch) sum to the serial bits."""
    from analyses.cdt import fast
    from analyses.cdt.engine import Engine, RuleOptions
    from analyses.planted.induction import induction_batch

    source = ModelSource("planted-induction", factory="analyses.planted.induction:planted_induction_model")
    model = source.load()
    engine = Engine(model, options=RuleOptions(attention="value_only"))  # not the default: actors must use it
    batches = [induction_batch(model, n=6, seed=seed) for seed in (0, 1)]
    torch.set_num_threads(1)
    with using(SerialMapper()):
        serial_sweep = fast.fast_sweep(engine, batches)
    with RayMapper(source, n_actors=2, threads=1) as mapper, using(mapper):
        sharded = fast.fast_sweep(engine, batches)
    assert mapper.items_per_actor == [2, 2]  # per batch, one source layer each
    for name in ("to_output", "to_z"):
        assert torch.equal(getattr(sharded, name), getattr(serial_sweep, name)), name
    assert all(torch.equal(sharded.to_input[c], serial_sweep.to_input[c]) for c in serial_sweep.to_input)
    assert sharded.clean_metric == serial_sweep.clean_metric
    assert serial_sweep.to_output.abs().argmax() // model.n_heads == 1  # the planted induction head's layer leads


TINY_SUCCESSOR = "{number_max: 20, run_probe: false, run_arithmetic: false, run_causal: false}"


def test_probe_sweep_and_probe_scan_ray_on_the_command_line(cluster, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [tiny-gpt2]\nanalyses: [successor]\ndevice: cpu\nconfig: {{successor: {TINY_SUCCESSOR}}}\n")
    assert main(["sweep", str(plan), "--out", str(tmp_path / "sweep")]) == 0
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert index["cells"] == [{"folder": "tiny-gpt2_seed0_base", "model": "tiny-gpt2", "seed": 0, "variant": "base",
                               "done": ["successor"], "errors": {}}]
    assert main(["sweep", str(plan), "--out", str(tmp_path / "sweep")]) == 0
    assert "successor: already done" in capsys.readouterr().err
    config = tmp_path / "config.yaml"
    config.write_text(f"successor: {TINY_SUCCESSOR}\n")
    out = tmp_path / "scan"
    assert main(["scan", "--model", "tiny-gpt2", "--device", "cpu", "--analyses", "successor", "--config", str(config),
                 "--out", str(out), "--ray", "--threads", "1"]) == 0
    scanned = json.loads((out / "results.json").read_text())["analyses"]["successor"]
    swept = json.loads((tmp_path / "sweep" / "tiny-gpt2_seed0_base" / "results.json").read_text())
    assert untimed(scanned) == untimed(swept["analyses"]["successor"]) and (out / "report.html").is_file()


# ---- no cluster needed ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("models: [tiny-llama]\n", "`analyses` must be a non-empty list"),
    ("models: [tiny-llama]\nanalyses: [successor]\nseed: [1]\n", "unknown key 'seed' (did you mean 'seeds'?)"),
    ("models: [tiny-llama]\nanalyses: [succesor]\n", "Unknown analysis 'succesor'"),
    ("models: [tiny-llama]\nanalyses: [successor]\nvariants: {a: {successor: {number_maxx: 3}}}\n",
     "did you mean 'number_max'"),
    ("models: [tiny-llama]\nanalyses: [successor]\nshards: {successor: 2}\n", "only retrieval, safety, cdt split"),
    ("models: [tiny-lama]\nanalyses: [successor]\n", "Unknown model spec 'tiny-lama' (did you mean 'tiny-llama'?)"),
    ("models: [tiny-llama\n", "is not valid YAML"),
    ("- just a list\n", "must be a mapping"),
])
def test_a_malformed_plan_is_one_line_and_exit_code_2(tmp_path, capsys, text, message):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_example_plan_reads():
    plan = read_plan(Path(__file__).resolve().parents[3] / "configs" / "sweep_example.yaml")
    assert len(plan.jobs()) == len(plan.models) * len(plan.analyses) * len(plan.seeds) * len(plan.variants) == 8


def test_without_ray_the_cluster_options_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["scan", "--model", "tiny-llama", "--analyses", "successor", "--out", str(tmp_path), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install probe[cluster]" in err and len(err.splitlines()) == 1
    plan = tmp_path / "plan.yaml"
    plan.write_text("models: [tiny-llama]\nanalyses: [successor]\n")
    assert main(["sweep", str(plan), "--out", str(tmp_path / "o")]) == 2
    assert "pip install probe[cluster]" in capsys.readouterr().err
