"""Retrieval heads: planted copy head, fast path == slow reference, NIAH builder, bad input, causal check."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from analyses import retrieval
from analyses.data.haystack import (
    NeedleNotFoundError,
    build_grid,
    build_sample,
    haystack_sentences,
    locate_span,
    rouge1_recall,
)
from analyses.data.needles import Needle
from analyses.planted import RETRIEVAL_DECOY as DECOY
from analyses.planted import RETRIEVAL_HEAD as PLANTED
from analyses.planted import RETRIEVAL_NEEDLE as PLANTED_NEEDLE
from analyses.planted import retrieval_model as planted_model
from analyses.planted import retrieval_samples as planted_samples
from analyses.planted import retrieval_sentences as filler_sentences
from analyses.retrieval import (
    NoRetrievalError,
    RetrievalConfig,
    RetrievalResult,
    answer_rows,
    attention_geometry,
    fast_sample,
    reference_sample,
)
from analyses.retrieval import detect, pipeline
from probe.errors import ProbeError, PromptTooLongError
from probe.fused_prefill import native_attention
from probe.models import LoadedModel, wrap_hf_model
from probe.tiny import word_tokenizer

# ---- the planted retrieval head: analyses.planted.retrieval_model -----------------------------------

@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    return planted_model()


def test_planted_head_is_found_first_and_alone(planted):
    samples = planted_samples(planted)
    traces = [fast_sample(planted, s, 6) for s in samples]
    spans = [s.answer_tokens[1] - s.answer_tokens[0] for s in samples]
    events, unique = (torch.stack([getattr(t, mode).double() / n for t, n in zip(traces, spans)]).mean(0)
                      for mode in ("events", "unique"))
    assert all(t.response.startswith(PLANTED_NEEDLE.answer) for t in traces)
    for scores in (events, unique):
        flat = scores.flatten()
        assert int(flat.argmax()) == PLANTED.layer * planted.n_heads + PLANTED.head
        assert scores[PLANTED.layer, PLANTED.head] > 0.9
        others = flat.clone()
        others[int(flat.argmax())] = 0
        assert others.max() <= 0.1
    # the decoy attends inside the needle but never to the token being written: no copy events
    assert all(int(t.argmax[0, DECOY.head, 0]) in range(*s.answer_tokens) for t, s in zip(traces, samples))
    assert events[DECOY.layer, DECOY.head] == 0


# six copies of the planted needle: the held-out split needs needles 3-5 (indices, the planted model only
# copies this one answer) and a haystack long enough for separate stretches (stride 40 sentences, masking
# shifted by 20; a 160-token prompt holds ~20 filler sentences)
HELD_OUT_NEEDLES = (PLANTED_NEEDLE,) * 6
HELD_OUT = dict(haystack_stride=40)


def _held_out_sentences() -> list[str]:
    return filler_sentences(count=260)


def test_planted_run_end_to_end_and_json_round_trip(planted):
    config = RetrievalConfig(lengths=(80, 160), depths=(0.0, 100.0), needles=(0,), template="base",
                             max_new_tokens=6, mask_ks=(1,), mask_random_draws=3, **HELD_OUT)
    result = retrieval.run(planted, config, needle_set=HELD_OUT_NEEDLES, sentences=_held_out_sentences())
    assert result.retained == result.attempted == 4
    # masking was held out: needles 3-5 at depth 50 (the midpoint of 0 and 100), other haystack sentences
    split = result.split
    assert not split["in_sample"] and split["overlap"] == {"needles": [], "depths": [], "haystack_sentences": 0}
    assert split["detection"]["needles"] == [0] and split["masking"]["needles"] == [3, 4, 5]
    assert split["masking"]["depths"] == [50.0] and len(result.masking.prompts) == 6
    assert {p["needle_index"] for p in result.masking.prompts} == {3, 4, 5}
    assert "masking held out" in retrieval.summary_text(result)
    assert [h for h, _ in result.retrieval_heads()] == [PLANTED]
    assert result.kv_scores("max")[0, 1] == result.scores[PLANTED]
    assert result.kv_scores("mean")[0, 1] == pytest.approx(result.scores[PLANTED] / 2)
    # causal check on the planted model: uniform attention or zero output on the planted head kills
    # retrieval; masking any one other head (3 seeded draws, never the planted one) does not
    table = {row["kind"]: row for row in result.masking.table()}
    for kind in ("uniform", "zero"):
        assert table[kind]["none"] == 1.0 and table[kind]["top"] < 0.3
        assert min(table[kind]["random"]) == 1.0
    random_heads = [c["heads"] for c in result.masking.conditions if c["selection"] == "random"]
    assert all(str(PLANTED) not in heads for heads in random_heads)
    again = RetrievalResult.from_json(result.to_json())
    torch.testing.assert_close(again.scores.scores, result.scores.scores.to(torch.float64))
    assert again.masking.table() == result.masking.table()
    assert again.split == result.split and again.masking.excluded == result.masking.excluded
    figs = retrieval.figures(result)
    assert {"heatmap", "top_heads", "niah_grid", "accuracy_vs_k"} <= set(figs)


def test_fast_path_equals_reference_on_planted_and_random_models(planted, tiny_gqa):
    for sample in planted_samples(planted, lengths=(60, 200), depths=(30, 100)):
        fast, slow = fast_sample(planted, sample, 6), reference_sample(planted, sample, 6)
        assert fast.answer_ids == slow.answer_ids
        assert torch.equal(fast.argmax, slow.argmax)
        assert torch.equal(fast.events, slow.events) and torch.equal(fast.unique, slow.unique)
    # random weights, GQA: every head's argmax row must agree, not only the copy counts
    ids = tiny_gqa.encode("the capital of mary is the book of john and the key to the park")
    fake = _with_ids(ids, (2, 6))
    fast, slow = fast_sample(tiny_gqa, fake, 8), reference_sample(tiny_gqa, fake, 8)
    assert len(fast.answer_ids) > 0 and fast.answer_ids == slow.answer_ids
    assert torch.equal(fast.argmax, slow.argmax)


def test_default_masking_split_is_disjoint_from_detection():
    """The presets hold masking out: other needles, depths between the detection depths, other haystack text."""
    for preset in (retrieval.QUICK, retrieval.DEFAULT):
        config = dataclasses.replace(preset, mask_ks=(1,))
        assert set(config.needles) == {0, 1, 2} and set(config.mask_needles) == {3, 4, 5}
        assert not set(config.masking_depths()) & set(config.depths) and config.masking_depths()
    assert retrieval.QUICK.masking_depths() == (25.0, 75.0)
    # on the real haystack, the default offsets give disjoint sentence ranges. A word-level tokenizer over the
    # haystack's words counts one token per word, at most a subword tokenizer's count, so each prompt
    # holds at least as many sentences as with a real model's tokenizer: the widest ranges
    from analyses.data.haystack import QUESTION_SUFFIX
    from analyses.data.needles import NEEDLES
    from probe.tiny import word_tokenizer

    pool = haystack_sentences()
    words = {w for text in pool for w in text.split()} | set(QUESTION_SUFFIX.split())
    words |= {w for n in NEEDLES for w in f"{n.fact} {n.question}".split()}
    fake = type("Fits", (), {"tokenizer": word_tokenizer(sorted(words)), "check_fits": lambda self, n: None})()
    for config in (retrieval.QUICK, retrieval.DEFAULT):
        longest = (max(config.lengths),)
        _, detection = retrieval.build_samples(fake, config.needles, longest, config.depths[:1], "base")
        _, masking = retrieval.build_samples(fake, config.mask_needles, longest, config.masking_depths()[:1], "base",
                                             shift=config.masking_offset())
        assert len(detection) == len(masking) == 3
        assert all(r["haystack_sentences"][1] - r["haystack_sentences"][0] > 50 for r in detection + masking)
        overlap = retrieval.split_overlap(detection, masking)
        assert overlap == {"needles": [], "depths": [], "haystack_sentences": 0}
        # the check itself sees a shared stretch
        assert retrieval.split_overlap(detection, detection[:1])["haystack_sentences"] > 50


def test_in_sample_masking_is_refused_before_any_work_unless_allowed(planted):
    base = RetrievalConfig(lengths=(80,), depths=(0.0, 100.0), needles=(0,), template="base", max_new_tokens=6,
                           mask_ks=(1,), mask_random_draws=1, mask_kinds=("uniform",), **HELD_OUT)
    data = dict(needle_set=HELD_OUT_NEEDLES, sentences=_held_out_sentences())
    cases = {"needles \\[0\\]": dict(mask_needles=(0,)),
             "depths \\[100.0\\]": dict(mask_depths=(100.0,)),
             "[1-9][0-9]* haystack sentences": dict(mask_offset=-120)}  # needle 3 reads needle 0's stretch
    for message, change in cases.items():
        said: list[str] = []
        with pytest.raises(retrieval.InSampleError, match=message):
            retrieval.run(planted, dataclasses.replace(base, **change), lambda f, m: said.append(m), **data)
        assert not any(m.startswith("scoring") for m in said)  # refused before detection ran
    result = retrieval.run(planted, dataclasses.replace(base, mask_needles=(0,), allow_in_sample=True), **data)
    assert result.split["in_sample"] and result.split["allow_in_sample"]
    assert result.split["overlap"]["needles"] == [0]
    assert "IN-SAMPLE (allow_in_sample)" in retrieval.summary_text(result)


def test_random_sets_exclude_every_head_above_the_threshold():
    """11 heads above 0.1: masking the top 10 must not let the 11th into any random set."""
    from probe.heads import Head
    from probe.results import HeadScores

    class Shape:  # what random_head_sets reads: the model's heads
        def all_heads(self):
            return [Head(l, h) for l in range(4) for h in range(8)]

    values = torch.full((4, 8), 0.01, dtype=torch.float64)
    ranked = [Head(l, h) for l in range(4) for h in range(8)][5:16]  # 11 heads, best first
    for rank, head in enumerate(ranked):
        values[head.layer, head.head] = 0.9 - 0.07 * rank  # the 11th: 0.2 > 0.1
    scores = HeadScores("planted", "score", values)
    excluded = retrieval.random_pool_exclusion(scores, 10, 0.1)
    assert set(excluded) == set(ranked)
    top = [h for h, _ in scores.top(10)]
    assert ranked[10] not in top
    conditions = retrieval.masking_conditions(Shape(), top, (10,), ("uniform",), 20, 0, exclude=excluded)
    drawn = {h for c in conditions if c["selection"] == "random" for h in c["heads"]}
    assert len(drawn) > 10 and not drawn & set(ranked)
    # without the exclusion the same draws do pick the 11th head (so the check above can fail)
    loose = retrieval.masking_conditions(Shape(), top, (10,), ("uniform",), 20, 0)
    assert ranked[10] in {h for c in loose if c["selection"] == "random" for h in c["heads"]}


def test_rouge_gate_stems_by_default(planted, monkeypatch):
    """'red foxes jumping high' retrieves 'red fox jumps high' only with stemming (1.0 vs 0.5, gate > 0.5)."""
    answer, response = PLANTED_NEEDLE.answer, "red foxes jumping high"
    assert retrieval.rouge1(answer, response) == 1.0
    assert retrieval.rouge1(answer, response, stem=False) == 0.5 == rouge1_recall(answer, response)
    real = retrieval.fast_sample
    monkeypatch.setattr(pipeline, "fast_sample",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), response=response))
    config = RetrievalConfig(lengths=(80,), depths=(0.0, 100.0), needles=(0,), template="base", max_new_tokens=6)
    data = dict(needle_set=(PLANTED_NEEDLE,), sentences=filler_sentences())
    assert RetrievalConfig().rouge_stem
    result = retrieval.run(planted, config, **data)
    assert result.retained == result.attempted == 2
    assert result.stem_changes()["verdict_changed"] == 2 == result.stem_changes()["pass_only_stemmed"]
    assert "stemming changes 2 of 2 detection verdicts" in retrieval.summary_text(result)
    with pytest.raises(NoRetrievalError, match="0 of 2"):
        retrieval.run(planted, dataclasses.replace(config, rouge_stem=False), **data)


def _tiny_gemma3() -> LoadedModel:
    tokenizer = word_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              sliding_window=6, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    return wrap_hf_model(Gemma3ForCausalLM(config).eval(), tokenizer, "tiny-gemma3", hub_name="probe/tiny-gemma3",
                         device="cpu")


@pytest.mark.parametrize("builder", ["tiny_gqa", "gemma3_sliding"])
def test_answer_rows_equal_the_models_own_pattern(builder, request):
    """Rows recomputed from hook_rot_q/hook_rot_k == hook_pattern rows (GQA, scaling, sliding window)."""
    model = _tiny_gemma3() if builder == "gemma3_sliding" else request.getfixturevalue(builder)
    ids = model.encode("the capital of mary is the book of john and the key to the park on monday")
    names = [f"blocks.{l}.attn.{n}" for l in range(model.n_layers) for n in ("hook_rot_q", "hook_rot_k", "hook_pattern")]
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    geometry = attention_geometry(model)
    if builder == "gemma3_sliding":
        assert [g.window for g in geometry] == [6, None, 6]
    first = 9
    for layer in range(model.n_layers):
        q = cache[f"blocks.{layer}.attn.hook_rot_q"][0, first:]
        k = cache[f"blocks.{layer}.attn.hook_rot_k"][0]
        rows = answer_rows(q, k, first, geometry[layer], model.group_size)
        expected = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, first:]
        torch.testing.assert_close(rows, expected, atol=1e-6, rtol=1e-5)
        if geometry[layer].window:  # the window is really applied: row 9 cannot see key 0
            assert rows[:, 0, 0].abs().max() == 0


def _with_ids(ids: torch.Tensor, span: tuple[int, int]):
    """A NIAH sample carrying arbitrary token ids (for random-weight models) and an answer span."""
    template = build_sample(planted_model().tokenizer, PLANTED_NEEDLE, 40, 50, "base", filler_sentences(), 0, 0)
    return dataclasses.replace(template, input_ids=tuple(ids[0].tolist()), answer_tokens=span)


def test_gemma3_fast_path_equals_reference_beyond_the_window():
    model = _tiny_gemma3()
    ids = model.encode(" ".join(["mary went to the park with john and the book"] * 3) + " what is the key")
    sample = _with_ids(ids, (3, 8))
    fast, slow = fast_sample(model, sample, 8), reference_sample(model, sample, 8)
    assert fast.answer_ids == slow.answer_ids and torch.equal(fast.argmax, slow.argmax)
    # sliding layers (0 and 2, window 6) never look further back than 5 tokens
    first = ids.shape[-1] - 1
    for layer in (0, 2):
        steps = torch.arange(first, first + fast.argmax.shape[-1])
        assert ((steps - fast.argmax[layer]) < 6).all()


@pytest.mark.parametrize("builder", ["tiny_gqa", "gemma3_sliding"])
def test_fast_path_keys_from_the_cache_are_the_hooked_rotated_keys(builder, request):
    """The fast path reads keys from the full DynamicCache instead of hooking them. Through the bridge the
    cache holds `hook_rot_k` bit for bit (post-RoPE, post k-norm); through the SDPA prefill it agrees to
    float rounding (sliding layers included); the bridge's own attention is back afterwards, also on error."""
    from transformers import DynamicCache

    model = _tiny_gemma3() if builder == "gemma3_sliding" else request.getfixturevalue(builder)
    ids = model.encode(" ".join(["the capital of mary is the book of john and the key to the park"] * 2))
    names = [f"blocks.{l}.attn.hook_rot_k" for l in range(model.n_layers)]

    def hooked_keys() -> tuple[torch.Tensor, dict]:
        logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        return logits, {l: cache[f"blocks.{l}.attn.hook_rot_k"][0] for l in range(model.n_layers)}

    with torch.no_grad():
        logits, expected = hooked_keys()
        through_bridge, native = DynamicCache(), DynamicCache()
        model.hf_model(ids, past_key_values=through_bridge, use_cache=True)
        with native_attention(model) as used:
            assert used and model.hf_model.config._attn_implementation == "sdpa"
            native_logits = model.hf_model(ids, past_key_values=native, use_cache=True).logits
        for layer in range(model.n_layers):
            assert torch.equal(detect._cached_keys(through_bridge, layer), expected[layer])
            torch.testing.assert_close(detect._cached_keys(native, layer), expected[layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(native_logits, logits, atol=1e-5, rtol=1e-4)
        with pytest.raises(RuntimeError, match="inside"):
            with native_attention(model):
                raise RuntimeError("inside the swap")
        # an attention hook someone attached must keep firing: then nothing is swapped
        with model.bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda tensor, hook: None)]):
            with native_attention(model) as used:
                assert not used and model.hf_model.config._attn_implementation == "eager"
        assert model.hf_model.config._attn_implementation == "eager"
        layers = model.hf_model.model.layers
        assert all(layers[l].original_component.self_attn is model.bridge.blocks[l].attn for l in range(model.n_layers))
        again_logits, again = hooked_keys()  # the bridge's hooks fire again, with the same values
        assert torch.equal(again_logits, logits) and all(torch.equal(again[l], expected[l]) for l in expected)


# ---- the NIAH builder ------------------------------------------------------------------------------

def test_haystack_is_clean_prose_without_repeats():
    sentences = haystack_sentences()
    assert len(sentences) > 20_000
    assert len(set(s.lower() for s in sentences)) == len(sentences)
    sample = " ".join(sentences[:2000])
    for markup in ("**", "##", "_Enter", "_Exit"):
        assert markup not in sample


def test_needle_at_sentence_boundary_with_exact_spans(planted):
    tok = planted.tokenizer
    sentences = filler_sentences()
    starts = []
    for depth in (0, 25, 50, 75, 100):
        sample = build_sample(tok, PLANTED_NEEDLE, 120, depth, "base", sentences, 0, 0)
        assert sample.context_tokens <= 120
        assert tok.decode(list(sample.answer_ids())) == PLANTED_NEEDLE.answer
        s, e = sample.needle_tokens
        assert tok.decode(list(sample.input_ids[s:e])) == PLANTED_NEEDLE.fact
        before = sample.prompt[: sample.needle_chars[0]].rstrip()
        assert before == "" or before.endswith(".")  # a sentence boundary
        assert abs(sample.actual_depth - depth / 100) < 0.1
        starts.append(s)
    assert starts == sorted(starts) and starts[0] == 1 and len(set(starts)) == 5


def test_unlocatable_needle_is_reported_not_scored(planted):
    # a needle whose answer words are outside the tiny vocabulary decodes as <unk>: skipped, with why
    alien = Needle(fact="the secret code is zebra quokka", question="what is the secret code ?",
                   answer="zebra quokka")
    grid = build_grid(planted.tokenizer, [60], [0, 100], (0, 1), "base", needles=(PLANTED_NEEDLE, alien),
                      sentences=filler_sentences(), stride=0)
    assert len(grid.samples) == 2 and len(grid.skipped) == 2
    assert all(s["needle_index"] == 1 and "does not contain" in s["reason"] for s in grid.skipped)
    with pytest.raises(NeedleNotFoundError):
        locate_span([(0, 3), (4, 7)], 10, 12)
    with pytest.raises(NeedleNotFoundError):
        build_sample(planted.tokenizer, Needle("a b c", "q", "x y"), 40, 0, "base", filler_sentences())


def test_rouge1_recall():
    assert rouge1_recall("three spoons of smoked paprika", "Three spoons of paprika.") == pytest.approx(0.8)
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)
    assert rouge1_recall("red fox", "nothing here") == 0.0
    with pytest.raises(ProbeError):
        rouge1_recall("", "x")


# ---- bad input -------------------------------------------------------------------------------------

def test_context_longer_than_the_window_is_refused_before_any_work(planted):
    config = RetrievalConfig(lengths=(5000,), depths=(0.0,), needles=(0,), template="base")
    with pytest.raises(PromptTooLongError, match="1024"):
        retrieval.run(planted, config)


def test_zero_successful_retrievals_is_an_error_with_the_ungated_result():
    broken = planted_model(copy_gain=0.0)  # the head still attends, but writes nothing: no retrieval
    config = RetrievalConfig(lengths=(80,), depths=(0.0, 100.0), needles=(0,), template="base", max_new_tokens=5)
    with pytest.raises(NoRetrievalError, match="0 of 2") as caught:
        retrieval.run(broken, config, needle_set=(PLANTED_NEEDLE,), sentences=filler_sentences())
    result = caught.value.result
    assert result is not None and result.retained == 0 and result.attempted == 2
    assert torch.isnan(result.variants["events"].scores).all()  # no fake zeros
    assert not torch.isnan(result.variants["events_ungated"].scores).any()


def test_bad_config_values_are_probe_errors(planted):
    for bad in (RetrievalConfig(score_mode="max"), RetrievalConfig(match="fuzzy"), RetrievalConfig(mask_kinds=("x",)),
                RetrievalConfig(template="chat")):
        with pytest.raises(ProbeError):
            retrieval.run(planted, bad)


# ---- the embedded models ---------------------------------------------------------------------------

@pytest.mark.embedded
def test_fast_path_equals_reference_on_smollm2(smollm2):
    """20 samples, short contexts: identical answers, argmax rows and scores."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    grid = build_grid(smollm2.tokenizer, [160, 240], [0, 40, 70, 100], (0, 1, 2, 3, 4), "base")
    samples = grid.samples[::2]
    assert len(samples) == 20 and not grid.skipped
    for sample in samples:
        fast, slow = fast_sample(smollm2, sample, 4), reference_sample(smollm2, sample, 4)
        assert fast.answer_ids == slow.answer_ids
        span = sample.answer_tokens[1] - sample.answer_tokens[0]
        for mode in ("events", "unique"):
            torch.testing.assert_close(getattr(fast, mode).double() / span, getattr(slow, mode).double() / span,
                                       atol=1e-6, rtol=0)
        assert torch.equal(fast.argmax, slow.argmax)


@pytest.mark.embedded
def test_gemma3_sliding_window_fast_path_equals_reference(gemma3):
    grid = build_grid(gemma3.tokenizer, [700], [0], (0,), "base")
    sample = grid.samples[0]
    assert sample.prompt_len - sample.answer_tokens[0] > 512  # the needle is outside the sliding window
    fast, slow = fast_sample(gemma3, sample, 3), reference_sample(gemma3, sample, 3)
    assert fast.answer_ids == slow.answer_ids and torch.equal(fast.argmax, slow.argmax)
    sliding = [l for l, g in enumerate(attention_geometry(gemma3)) if g.window]
    assert len(sliding) == 15
    # sliding layers cannot reach the needle from the answer rows
    start, stop = sample.answer_tokens
    assert not ((fast.argmax[sliding] >= start) & (fast.argmax[sliding] < stop)).any()


@pytest.mark.embedded
def test_masking_smollm2_top_heads_hurts_retrieval_more_than_random_heads(smollm2):
    """Causal check, held out: heads found on needles 0-1 (depths 0 / 100 %), masked on needles 3-5 at
    depth 50 % on other haystack text. Uniform attention on the top-10 heads (answer rows only) lowers NIAH
    recall more than on any of 3 seeded random 10-head sets drawn outside every head above 0.1. (Held out,
    k = 3 is not enough here: top-3 95 % vs random 73-100 %; k = 10: 5 % vs 73-100 %.)"""
    config = RetrievalConfig(lengths=(300,), depths=(0.0, 100.0), needles=(0, 1), template="chat",
                             max_new_tokens=32, mask_ks=(10,), mask_kinds=("uniform",), mask_random_draws=3)
    result = retrieval.run(smollm2, config)
    assert result.retained >= 1
    assert not result.split["in_sample"] and result.split["masking"]["needles"] == [3, 4, 5]
    row = result.masking.table()[0]
    assert row["top"] < min(row["random"])
    assert row["none"] - row["top"] >= 0.2
