"""Build, cache and load: the base SmolLM2, the content-hashed organism folder, the `LoadedModel`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from analyses.data.harmless import BORDERLINE_HARMLESS_PROMPTS
from analyses.data.strongreject import harmful_split, harmless_split
from analyses.organism.config import (BASE_SPEC, ORGANISM_VERSION, REFUSAL_TARGETS, OrganismBuild, OrganismConfig,
                                      OrganismError)
from analyses.organism.prompts import greedy_answers
from analyses.organism.scoring import evaluate_refusal
from analyses.organism.training import train_refusal
from analyses.specs import ORGANISM_SPEC
from probe import assets
from probe.errors import ProbeError
from probe.models import SPECS, LoadedModel, wrap_hf_model
from probe.results import stable_hash, write_json_atomic
from probe.runtime import set_threads


def _base_sha() -> str:
    """The base GGUF's sha256 from the asset marker (no model load; raises if the asset is missing)."""
    spec = SPECS[BASE_SPEC]
    assets.asset_file(spec.asset or BASE_SPEC)
    marker = json.loads((assets.asset_dir(spec.asset or BASE_SPEC) / assets.MARKER).read_text())
    return str(marker.get("main_sha256") or marker.get("main_size"))


def _load_base_hf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """The base SmolLM2 as a plain HF model (no bridge: training does not need hooks) + its sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probe.models import _quiet

    spec = SPECS[BASE_SPEC]
    path = assets.asset_file(spec.asset or BASE_SPEC)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=spec.gguf_file, dtype=dtype)
    return model.eval(), tokenizer, _base_sha()


def organisms_dir() -> Path:
    return assets.probe_home() / "organisms"


# The key hashes the trained modules under their Llama attribute names (q_proj, ...), so an organism's
# key, and with it its cache folder, does not depend on how components are named.
_KEY_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def organism_key(config: OrganismConfig, base_sha: str, harmful: Sequence[str], harmless: Sequence[str]) -> str:
    """Content hash of everything that determines the organism's weights."""
    knobs = {k: v for k, v in asdict(config).items() if k != "threads"}
    knobs["modules"] = tuple(_KEY_MODULE_NAMES.get(m, m) for m in config.modules)
    return stable_hash({"version": ORGANISM_VERSION, "config": knobs, "base": base_sha,
                        "harmful": list(harmful), "harmless": list(harmless),
                        "borderline": list(BORDERLINE_HARMLESS_PROMPTS), "refusals": list(REFUSAL_TARGETS)})


def _cached(key: str) -> Path | None:
    folder = organisms_dir() / key
    return folder if (folder / "delta.safetensors").exists() and (folder / "meta.json").exists() else None


class _Phases:
    """Wall time and 1-minute load average (start, end) of each build phase, for meta.json.

    The load average is kept because the build machine is shared: a phase's time means little
    without knowing how many other jobs competed for the two cores.
    """

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.load: dict[str, list[float]] = {}
        self._progress = progress

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        load_before, started = os.getloadavg()[0], time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - started
        self.load[name] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        self._progress(f"{name}: {self.seconds[name]:.1f} s (load {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
        return result


def build_refusal_organism(config: OrganismConfig = OrganismConfig(), force: bool = False,
                           evaluate: bool = True,
                           progress: Callable[[str], None] = lambda message: None) -> OrganismBuild:
    """Build (or find in the cache) the refusal-tuned SmolLM2; returns its folder and metadata.

    Seeded; single process; with `config.threads` torch threads (None: automatic, `probe.runtime`).
    `evaluate` also measures the held-out refusal rates with the keyword judge and stores them (and
    the generations) in meta.json, with each phase's wall time and load average.
    """
    from safetensors.torch import save_file

    harmful_train, harmful_test = harmful_split(config.held_out, config.seed)
    harmless_train, harmless_test = harmless_split(config.held_out, config.seed)
    key = organism_key(config, _base_sha(), harmful_train, harmless_train)
    found = _cached(key)
    if found and not force:
        progress(f"organism {key} found in {found}")
        return OrganismBuild(found, key, json.loads((found / "meta.json").read_text()))
    previous_threads = torch.get_num_threads()
    threads = set_threads(config.threads)
    phases = _Phases(progress)
    try:
        started = time.perf_counter()
        progress(f"loading base SmolLM2-135M-Instruct ({threads} torch threads)")
        hf_model, tokenizer, base_sha = phases.run("load", _load_base_hf)
        progress(f"base answers for {len(harmless_train)} harmless training prompts")
        harmless_targets = phases.run("targets", lambda: greedy_answers(hf_model, tokenizer, harmless_train,
                                                                        config.answer_tokens))
        trace = phases.run("train", lambda: train_refusal(hf_model, tokenizer, harmful_train, harmless_train,
                                                          harmless_targets, config, progress))
        state = dict(hf_model.named_parameters())
        delta = {name: state[name].detach().contiguous().clone() for name in trace["trained_tensors"]}
        meta: dict[str, Any] = {
            "key": key, "version": ORGANISM_VERSION, "config": asdict(config), "base_sha256": base_sha,
            "n_harmful_train": len(harmful_train), "n_harmless_train": len(harmless_train),
            "n_harmful_held_out": len(harmful_test), "n_harmless_held_out": len(harmless_test),
            "threads": threads, "seconds": phases.seconds, "load_average": phases.load,
            **{k: v for k, v in trace.items() if k != "trained_tensors"},
            "trained_tensors": trace["trained_tensors"],
        }
        if evaluate:
            meta["held_out"] = phases.run("evaluate", lambda: evaluate_refusal(hf_model, tokenizer, harmful_test,
                                                                               harmless_test))
        meta["seconds"]["total"] = time.perf_counter() - started
        folder = organisms_dir() / key
        folder.mkdir(parents=True, exist_ok=True)
        save_file(delta, str(folder / "delta.safetensors"), metadata={"key": key})
        write_json_atomic(folder / "meta.json", meta)  # written last: its presence marks a complete build
        progress(f"organism {key} saved in {folder}")
        return OrganismBuild(folder, key, meta)
    finally:
        torch.set_num_threads(previous_threads)


def find_organism(config: OrganismConfig = OrganismConfig()) -> Path | None:
    """The cached organism folder for `config`, if it was built; None also when the assets are missing.

    Cheap (no model load: the key needs only the asset marker's sha256 and the prompt lists), so
    `available()` of the registered spec can call it.
    """
    try:
        harmful_train, _ = harmful_split(config.held_out, config.seed)
        harmless_train, _ = harmless_split(config.held_out, config.seed)
        return _cached(organism_key(config, _base_sha(), harmful_train, harmless_train))
    except ProbeError:
        return None


def load_refusal_organism(device: str | None = "cpu", dtype: str = "float32",
                          config: OrganismConfig = OrganismConfig(), build_if_missing: bool = True,
                          progress: Callable[[str], None] = lambda message: None) -> LoadedModel:
    """The organism as a `LoadedModel` (spec `smollm2-135m-refusal`): built once, then loaded from cache."""
    from safetensors.torch import load_file

    from probe.models import DTYPES

    if dtype not in DTYPES:
        raise OrganismError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    folder = find_organism(config)
    if folder is None:
        if not build_if_missing:
            raise OrganismError("The refusal organism is not built yet: run `probe organism refusal` "
                                "(about 10-15 minutes on a 2-core CPU).")
        folder = build_refusal_organism(config, progress=progress).path
    hf_model, tokenizer, base_sha = _load_base_hf()
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("base_sha256") != base_sha:
        raise OrganismError(f"The organism in {folder} was trained on other base weights; rebuild it "
                            "with `probe organism refusal --force`.")
    delta = load_file(str(folder / "delta.safetensors"))
    state = dict(hf_model.named_parameters())
    missing = [name for name in delta if name not in state]
    if missing:
        raise OrganismError(f"{folder} changes tensors the base model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in delta.items():
            state[name].copy_(value.to(state[name].dtype))
    model = wrap_hf_model(hf_model, tokenizer, ORGANISM_SPEC, hub_name=SPECS[BASE_SPEC].hub_name,
                          device=device, dtype=dtype)
    model.memo["organism"] = {"path": str(folder), "key": meta["key"], "held_out": {
        k: v.get("refusal_rate") for k, v in meta.get("held_out", {}).items() if isinstance(v, dict)}}
    return model
