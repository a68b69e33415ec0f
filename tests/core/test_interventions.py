"""Each intervention kind does what the maths says, on tiny models (MHA, GQA and GPT-2 shaped)."""

from __future__ import annotations

import pytest
import torch

from probe.errors import HeadError, InterventionError
from probe.heads import Head
from probe.interventions import (
    active_hook_count,
    capture_z,
    head_means,
    intervene,
    mean_ablation,
    resample_ablation,
    scale,
    uniform_attention,
    zero_ablation,
)

PROMPT = "the capital of mary is the book of john and the key"


def _run(model, ids, layer):
    names = {f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"}
    logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    return logits, cache


def _head_out(model, z, head):
    """The head's direct write into the residual stream: z_h @ W_O[h]."""
    return torch.einsum("bpd,dm->bpm", z[:, :, head.head], model.bridge.W_O[head.layer, head.head])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gqa", "tiny_gpt2"])
def test_zero_ablation_removes_exactly_the_heads_output(fixture, request):
    model = request.getfixturevalue(fixture)
    head = Head(1, 2)
    ids = model.encode(PROMPT)
    _, clean = _run(model, ids, head.layer)
    with intervene(model, zero_ablation([head])):
        _, ablated = _run(model, ids, head.layer)
    delta = ablated[f"blocks.{head.layer}.hook_attn_out"] - clean[f"blocks.{head.layer}.hook_attn_out"]
    expected = -_head_out(model, clean[f"blocks.{head.layer}.attn.hook_z"], head)
    assert expected.abs().max() > 1e-3  # the head does write something
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("factor", [3.0, 0.0, -1.5])
def test_output_and_value_scaling_scale_the_direct_contribution(tiny_gqa, factor):
    model, head = tiny_gqa, Head(0, 1)
    ids = model.encode(PROMPT)
    _, clean = _run(model, ids, 0)
    contribution = _head_out(model, clean["blocks.0.attn.hook_z"], head)
    for component in ("output", "value"):
        with intervene(model, scale([head], component, factor)):
            _, scaled = _run(model, ids, 0)
        delta = scaled["blocks.0.hook_attn_out"] - clean["blocks.0.hook_attn_out"]
        torch.testing.assert_close(delta, (factor - 1.0) * contribution, atol=1e-5, rtol=1e-4)


def test_gqa_value_scaling_leaves_the_rest_of_the_group_alone(tiny_gqa):
    model = tiny_gqa
    assert model.n_kv_heads == 2 and model.group_size == 2
    target = Head(0, 2)
    sibling = Head(0, model.query_heads_of(model.kv_head_of(2))[1])
    assert sibling.head == 3 and model.kv_head_of(3) == model.kv_head_of(2)
    ids = model.encode(PROMPT)
    _, clean = _run(model, ids, 0)
    with intervene(model, scale([target], "value", 2.0)):
        _, scaled = _run(model, ids, 0)
    z0, z1 = clean["blocks.0.attn.hook_z"], scaled["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z1[:, :, target.head], 2 * z0[:, :, target.head])
    for other in (0, 1, sibling.head):
        torch.testing.assert_close(z1[:, :, other], z0[:, :, other])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gqa", "tiny_gpt2"])
def test_uniform_attention_gives_one_over_prefix_length(fixture, request):
    model = request.getfixturevalue(fixture)
    head = Head(0, 1)
    ids = model.encode(PROMPT)
    _, clean = _run(model, ids, 0)
    with intervene(model, uniform_attention([head])):
        _, masked = _run(model, ids, 0)
    pattern = masked["blocks.0.attn.hook_pattern"][0, head.head]
    n = ids.shape[1]
    expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)
    torch.testing.assert_close(pattern, expected)
    others = [h for h in range(model.n_heads) if h != head.head]
    torch.testing.assert_close(masked["blocks.0.attn.hook_pattern"][0, others],
                               clean["blocks.0.attn.hook_pattern"][0, others])


def test_query_scaling_equals_scaling_the_rotated_query(tiny_gqa):
    model, head, factor = tiny_gqa, Head(1, 3), 0.3
    ids = model.encode(PROMPT)

    def scale_q(q, hook):
        q = q.clone()
        q[:, :, head.head] *= factor
        return q

    manual = model.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{head.layer}.attn.hook_rot_q", scale_q)])
    with intervene(model, scale([head], "query", factor)):
        ours = model.logits(ids)
    clean = model.logits(ids)
    assert (manual - clean).abs().max() > 1e-4
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-4)


def test_mean_and_resample_write_the_reference_values(tiny_llama):
    model, head = tiny_llama, Head(1, 0)
    ids = model.encode(PROMPT)
    refs = [model.encode("the book of mary"), model.encode("a key to the park and the store")]
    means = head_means(model, refs, [head])
    z_all = torch.cat([capture_z(model, r, [head])[head][0] for r in refs])
    torch.testing.assert_close(means[head], z_all.mean(0))
    with intervene(model, mean_ablation([head], means)):
        _, cache = _run(model, ids, 1)
    z = cache["blocks.1.attn.hook_z"][0, :, head.head]
    torch.testing.assert_close(z, means[head].expand_as(z))

    source = model.encode("alice gave the book to bob and then went to the park on monday")[:, : ids.shape[1]]
    source_z = capture_z(model, source, [head])
    with intervene(model, resample_ablation([head], {head: source_z[head][0]})):
        _, cache = _run(model, ids, 1)
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"][0, :, head.head], source_z[head][0])


def test_position_window_and_batch_rows(tiny_llama):
    model, head = tiny_llama, Head(0, 2)
    ids = model.encode(PROMPT).repeat(2, 1)
    _, clean = _run(model, ids, 0)
    with intervene(model, zero_ablation([head], start=5, rows=(1,))):
        _, cut = _run(model, ids, 0)
    z0, z1 = clean["blocks.0.attn.hook_z"], cut["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z1[0], z0[0])  # row 0 untouched
    torch.testing.assert_close(z1[1, :5], z0[1, :5])  # positions before start untouched
    assert z1[1, 5:, head.head].abs().max() == 0


def test_hooks_are_removed_even_after_an_exception(tiny_llama):
    model = tiny_llama
    before = active_hook_count(model)
    ids = model.encode(PROMPT)
    clean = model.logits(ids)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, [zero_ablation([Head(0, 0)]), uniform_attention([Head(1, 1)])]):
            assert active_hook_count(model) > before
            raise RuntimeError("boom")
    assert active_hook_count(model) == before
    torch.testing.assert_close(model.logits(ids), clean)


def test_interventions_compose(tiny_llama):
    model = tiny_llama
    ids = model.encode(PROMPT)
    a, b = zero_ablation([Head(0, 0)]), scale([Head(0, 0)], "output", 5.0)
    with intervene(model, a):
        only_a = model.logits(ids)
    with intervene(model, [b, a]):  # zero after scaling is still zero
        both = model.logits(ids)
    torch.testing.assert_close(both, only_a)


def test_run_with_cache_sees_the_intervention(tiny_llama):
    model, head = tiny_llama, Head(1, 1)
    ids = model.encode(PROMPT)
    with intervene(model, zero_ablation([head])):
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    assert cache["blocks.1.attn.hook_z"][0, :, head.head].abs().max() == 0


@pytest.mark.parametrize("make", [
    lambda h: uniform_attention([h], start=6),
    lambda h: zero_ablation([h], start=6),
    lambda h: scale([h], "query", -2.0),
])
def test_cached_generation_matches_full_recomputation(tiny_gqa, make):
    """With the KV cache each hook sees one new row; the result must equal re-running the whole sequence."""
    model, head = tiny_gqa, Head(1, 0)
    ids = model.encode("the capital of mary is")
    intervention = make(head)
    with intervene(model, intervention):
        cached = model.generate(ids, max_new_tokens=6)
        sequence = ids
        for _ in range(6):
            next_id = model.logits(sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_id], dim=1)
    assert cached.tolist() == sequence[:, ids.shape[1]:].tolist()


def test_bad_interventions_are_clear_errors(tiny_llama):
    model = tiny_llama
    with pytest.raises(HeadError, match="2 layers"):
        with intervene(model, zero_ablation([Head(7, 0)])):
            pass
    with pytest.raises(InterventionError, match="query, value or output"):
        scale([Head(0, 0)], "key", 2.0)
    with pytest.raises(InterventionError, match="mean-ablation mean"):
        mean_ablation([Head(0, 0)], {})
    per_pos = {Head(0, 0): torch.zeros(3, model.d_head)}
    with pytest.raises(InterventionError, match="cover 3 positions"):
        with intervene(model, mean_ablation([Head(0, 0)], per_pos)):
            model.logits(model.encode(PROMPT))


def test_a_concurrent_thread_never_runs_through_another_threads_hooks(tiny_llama):
    """The app shares one model between sessions (threads): the model lock keeps them apart."""
    import threading

    model = tiny_llama
    ids = model.encode(PROMPT)
    clean = model.logits(ids)
    results: list[torch.Tensor] = []
    entered, release = threading.Event(), threading.Event()

    def other_session():
        entered.wait()
        results.append(model.logits(ids))

    thread = threading.Thread(target=other_session)
    thread.start()
    with intervene(model, zero_ablation(model.all_heads())):
        entered.set()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # blocked while this thread's hooks are attached
        intervened = model.logits(ids)
    thread.join(timeout=10)
    assert not torch.allclose(intervened, clean)
    torch.testing.assert_close(results[0], clean)


def test_streaming_attention_keeps_only_sink_and_recent_keys(tiny_gqa):
    from probe.interventions import streaming_attention

    model, head = tiny_gqa, Head(0, 1)
    ids = model.encode(PROMPT)
    n = ids.shape[1]
    with intervene(model, streaming_attention([head], sink=2, recent=3)):
        _, cache = _run(model, ids, 0)
    pattern = cache["blocks.0.attn.hook_pattern"][0, head.head]
    for t in range(n):
        allowed = {j for j in range(t + 1) if j < 2 or j > t - 3}
        nonzero = {j for j in range(n) if pattern[t, j] > 0}
        assert nonzero == allowed, t
        assert abs(float(pattern[t].sum()) - 1) < 1e-5
    # decode-only: prompt positions keep full attention, cached generation matches full recomputation
    with intervene(model, streaming_attention([head], sink=1, recent=2, start=n)):
        cached = model.generate(ids, max_new_tokens=4)
        sequence = ids
        for _ in range(4):
            sequence = torch.cat([sequence, model.logits(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence[:, n:].tolist()


def test_resample_with_one_source_per_batch_row(tiny_llama):
    model, head = tiny_llama, Head(1, 3)
    ids = torch.cat([model.encode("the capital of mary is"), model.encode("a key to the park")])
    sources = torch.cat([model.encode("alice gave the book to"), model.encode("bob went to the store")])
    source_z = capture_z(model, sources, [head])[head]  # [2, pos, d_head]
    with intervene(model, resample_ablation([head], {head: source_z})):
        _, cache = _run(model, ids, 1)
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"][:, :, head.head], source_z)
    with pytest.raises(InterventionError, match="rows"):
        with intervene(model, resample_ablation([head], {head: source_z[:1]})):
            model.logits(ids)


def test_position_windows_hold_on_sliding_window_layers_during_generation():
    """Gemma-style windowed layers: the cache must keep every key so absolute positions stay right."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from probe import tiny
    from probe.models import wrap_hf_model

    tokenizer = tiny.word_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = wrap_hf_model(Gemma3ForCausalLM(config).eval(), tokenizer, "tiny-gemma3", hub_name="probe/tiny-gemma3",
                          device="cpu")
    ids = model.encode("the capital of mary is the book of john")
    head = Head(0, 1)
    with intervene(model, uniform_attention([head], start=ids.shape[1])):
        cached = model.generate(ids, max_new_tokens=6)
        sequence = ids
        for _ in range(6):
            sequence = torch.cat([sequence, model.logits(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence[:, ids.shape[1]:].tolist()


def test_streaming_keep_masks_only_its_rows_and_window():
    """The keep-mask shared by the bridge's score hook and the fused path's SDPA mask: sink ∪ recent on the
    intervention's rows and absolute positions [start, stop) (shifted by the cache offset), True elsewhere."""
    from probe.interventions import streaming_attention, streaming_keep

    intervention = streaming_attention([Head(0, 0)], sink=1, recent=2, start=5, stop=8, rows=(1,))
    offset, q_len, k_len = 3, 6, 9  # queries at absolute positions 3..8
    keep = streaming_keep(intervention, offset, 3, q_len, k_len)
    assert keep.shape == (3, q_len, k_len) and keep.dtype == torch.bool
    assert bool(keep[0].all()) and bool(keep[2].all())
    for q in range(q_len):
        t = offset + q
        expected = [j < 1 or j > t - 2 for j in range(k_len)] if 5 <= t < 8 else [True] * k_len
        assert keep[1, q].tolist() == expected, t
    with pytest.raises(InterventionError, match="not streaming"):
        streaming_keep(zero_ablation([Head(0, 0)]), 0, 1, 2, 2)
