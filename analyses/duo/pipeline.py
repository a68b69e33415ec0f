"""The analyzer's `run`: train the gates, deploy them, measure NIAH against full attention and random
streaming sets, and the KV-cache saving."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from analyses.common import Progress, no_progress, provenance
from analyses.data.haystack import build_grid, haystack_sentences
from analyses.data.needles import NEEDLES, Needle
from analyses.duo.config import ANALYZER, QUICK, VERSION, DuoConfig, DuoError, DuoResult
from analyses.duo.deployment import binarise, kv_cache_bytes, streaming_heads
from analyses.duo.gates import train_gates
from analyses.duo.niah import niah_runs, profiling_scores, retrieval_agreement, spearman
from analyses.duo.passkeys import PasskeySample, passkey_sample
from probe.architecture import architecture
from probe.models import LoadedModel
from probe.results import HeadScores


def _template(model: LoadedModel, template: str) -> str:
    if template == "auto":
        return "chat" if model.chat_template else "base"
    return template


def run(model: LoadedModel, config: DuoConfig = QUICK, progress: Progress | None = None,
        samples: Sequence[PasskeySample] | None = None, needle_set: Sequence[Needle] = NEEDLES,
        sentences: Sequence[str] | None = None) -> DuoResult:
    """Learn the gates, deploy them at the configured ratio, measure NIAH and the KV-cache saving.

    `samples` (training prompts), `needle_set` and `sentences` (NIAH evaluation) replace the synthetic
    passkeys, the project's needles and the Shakespeare haystack (planted models, custom data).
    """
    config.validate()
    say = progress or no_progress
    say(0.0, "building passkey prompts")
    training = train_gates(model, config, say, samples=samples)
    retrieval = binarise(training.gates, config.retrieval_fraction, config.seed)
    pool = haystack_sentences() if sentences is None else list(sentences)
    grid = build_grid(model.tokenizer, config.eval_lengths, config.eval_depths, config.eval_needles,
                      _template(model, config.template), needles=needle_set, sentences=pool)
    if not grid.samples:
        raise DuoError(f"No NIAH sample could be built: {grid.skipped}")
    n_streaming = int((~retrieval).sum())
    rng = random.Random(config.seed + 1)
    kv_heads = [(l, g) for l in range(model.n_layers) for g in range(model.n_kv_heads)]
    random_sets = []
    for _ in range(config.random_draws):
        chosen = set(rng.sample(kv_heads, n_streaming))
        mask = torch.tensor([[(l, g) not in chosen for g in range(model.n_kv_heads)] for l in range(model.n_layers)])
        random_sets.append(streaming_heads(model, mask))
    say(0.65, f"NIAH: full attention, Duo streaming heads and {config.random_draws} random sets "
              f"on {len(grid.samples)} samples")
    full, duo, *random_runs = niah_runs(model, grid.samples, [[], streaming_heads(model, retrieval), *random_sets],
                                        config, lambda f, m: say(0.65 + 0.3 * f, m))
    rng_samples = random.Random(config.seed + 2)
    profile_sample = samples[0] if samples else passkey_sample(model, config, rng_samples, pool)
    profile = profiling_scores(model, profile_sample,
                               config.sink, config.recent)
    query_gates = training.gates[:, architecture(model).kv_index]
    data = {"passkeys": config.n_passkeys, "context": config.context_length,
            "training": [s.ids.tolist() for s in samples] if samples else "synthetic passkeys",
            "niah": [s.summary() for s in grid.samples]}
    prov = provenance(model, ANALYZER, VERSION, config, data, config.seed)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    random_means = [mean(r) for r in random_runs]
    niah = {"samples": [s.label for s in grid.samples], "skipped": grid.skipped, "full": full, "duo": duo,
            "random": random_runs, "full_mean": mean(full), "duo_mean": mean(duo),
            "random_means": random_means, "random_mean": mean(random_means) if random_means else float("nan"),
            "random_std": float(torch.tensor(random_means).std()) if len(random_means) > 1 else 0.0,
            "n_streaming_kv": n_streaming}
    memory = [kv_cache_bytes(model, retrieval, n, config.sink, config.recent)
              for n in sorted({*config.eval_lengths, config.memory_context})]
    say(1.0, "done")
    return DuoResult(
        scores=HeadScores("duo gate", "learned gate α of the head's KV group (1 = full attention)", query_gates, prov,
                          "DuoAttention gates, distilled on synthetic passkeys"),
        gates=training.gates, retrieval_kv=retrieval.tolist(), losses=training.losses, distill=training.distill,
        gate_history=training.gate_history, train_seconds=training.seconds, steps_done=training.steps_done,
        regime=config.regime, niah=niah, memory=memory,
        profiling_spearman=spearman(training.gates, profile), retrieval_spearman=(
            (retrieval_agreement(model, training.gates) or {}).get("spearman")),
        provenance=prov)
