"""probe.generation: a left-padded greedy batch continues each row as that row alone, on the families
whose positions differ (rotary Llama, partial-rotary parallel GPT-NeoX, learned-position GPT-2), and
interventions attached to the model are in effect during generation.

The tiny random families of tests/support/families.py, loaded the user's way (`hf:<folder>`), are "sharpened"
here (2-D weights x10, biases zeroed): at the stock init the LayerNorm families continue every prompt
with one constant token, and a padding bug could not change the ids.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from families import build_folder
from probe.errors import ProbeError
from probe.generation import _pad_id, decode_variants, greedy_continuations, greedy_generate
from probe.heads import Head
from probe.interventions import intervene, scale, streaming_attention, zero_ablation
from probe.models import LoadedModel, load_model

ROWS = ("mary went to the store", "the capital of the country is a secret and the answer is 12", "a book",
        "the key to the park is 13")
NEW = 5
_LOADED: dict[str, LoadedModel] = {}


def sharpened(name: str, root: Path) -> LoadedModel:
    if name not in _LOADED:
        source = build_folder(name, root / "stock")
        hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        with torch.no_grad():
            for parameter_name, parameter in hf.named_parameters():
                if parameter.dim() == 2:
                    parameter.mul_(10.0)
                elif parameter_name.endswith("bias"):
                    parameter.zero_()
        folder = root / "sharp" / name
        hf.save_pretrained(folder)
        transformers.AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        _LOADED[name] = load_model(f"hf:{folder}", device="cpu")
    return _LOADED[name]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generation")


def step_by_step(model: LoadedModel, text: str, n: int) -> list[int]:
    """The reference: one full forward per new token on the row alone (no padding, no KV cache)."""
    ids = model.encode(text, add_special_tokens=True)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model.logits(ids)[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "gpt2"])
def test_left_padded_batch_gives_each_rows_greedy_ids_alone(name, root):
    model = sharpened(name, root)
    batched = greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=())
    reference = [step_by_step(model, text, NEW) for text in ROWS]
    assert batched == reference
    assert len({tuple(row) for row in batched}) == len(ROWS)  # the rows differ: padding could show
    # the raw-HF entry point (the organism's) and a batch of 2 (the padding differs per batch) agree
    assert greedy_continuations(model.hf_model, model.tokenizer, list(ROWS), NEW, batch_size=2,
                                add_special_tokens=True, stop_ids=()) == reference


def test_generation_stops_after_the_first_stop_id(root):
    model = sharpened("llama", root)
    full = greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=())
    stop = full[0][1]
    cut = greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=[stop])
    for row, got in zip(full, cut):
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert got == expected
    assert cut[0] == full[0][:2]


def test_an_attached_intervention_changes_the_greedy_ids(root):
    """Zero-ablating every head of layer 0 moves the first greedy token (checked on the full forward
    first, so the case provably differs); generation under the intervention follows the ablated model."""
    model = sharpened("llama", root)
    ablation = zero_ablation([Head(0, h) for h in range(model.n_heads)])
    ids = model.encode(ROWS[0], add_special_tokens=True)
    with torch.no_grad():
        clean_first = int(model.logits(ids)[0, -1].argmax())
        with intervene(model, [ablation]):
            ablated_first = int(model.logits(ids)[0, -1].argmax())
    assert clean_first != ablated_first
    clean = greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=())
    with intervene(model, [ablation]):
        ablated = greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=())
        reference = [step_by_step(model, text, NEW) for text in ROWS]
    assert ablated[0][0] == ablated_first and clean[0][0] == clean_first
    assert ablated == reference and ablated != clean
    assert greedy_generate(model, list(ROWS), NEW, add_special_tokens=True, stop_ids=()) == clean  # removed on exit


def test_pad_id_falls_back_through_eos_and_the_model_config():
    model = SimpleNamespace(generation_config=None, config=SimpleNamespace(pad_token_id=None, eos_token_id=[7, 8]))
    assert _pad_id(model, SimpleNamespace(pad_token_id=5, eos_token_id=2), set()) == 5
    assert _pad_id(model, SimpleNamespace(pad_token_id=None, eos_token_id=2), set()) == 2
    assert _pad_id(model, SimpleNamespace(pad_token_id=None, eos_token_id=None), set()) == 7
    bare = SimpleNamespace(generation_config=None, config=SimpleNamespace())
    assert _pad_id(bare, SimpleNamespace(), {9}) == 9
    assert _pad_id(bare, SimpleNamespace(), set()) == 0


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("routing", [True, False])
def test_decode_variants_gives_each_variant_the_ids_it_gets_alone(name, routing, root):
    """One shared prefill, one batch row per intervention set (decode positions only): each row's ids equal
    `model.generate` under that set alone, on the fused path and on the bridge (GQA, soft-capped eager
    Gemma 2, GPT-2's learned positions); the variants provably differ; a set that touches the prompt is
    refused."""
    if name == "gemma2":
        from families import build_folder

        model = load_model(f"hf:{build_folder(name, root / 'stock')}", device="cpu")  # sliding windows: 8 tokens
    else:
        model = sharpened(name, root)
    model.fused_routing = routing
    try:
        ids = model.encode(ROWS[1] + " " + ROWS[3], add_special_tokens=True)
        start = ids.shape[1]
        layer0 = [Head(0, h) for h in range(model.n_heads)]
        variants = [[], [zero_ablation(layer0, start=start)], [streaming_attention(model.all_heads(), 1, 2, start=start)],
                    [scale(layer0[:1], "value", 3.0, start=start + 2), zero_ablation([Head(1, 0)], start=start + 1)]]
        got = decode_variants(model, ids, variants, max_new_tokens=8, stop_ids=())
        expected = []
        for variant in variants:
            with intervene(model, variant):
                expected.append(model.generate(ids, max_new_tokens=8)[0].tolist())
        assert got == expected
        assert len({tuple(row) for row in got}) >= 3, got
        with pytest.raises(ProbeError, match="touches the prompt"):
            decode_variants(model, ids, [[zero_ablation(layer0, start=start - 1)]], max_new_tokens=2)
    finally:
        model.fused_routing = True


def test_growing_cache_equals_dynamic_cache_and_writes_decode_steps_in_place():
    """`growing_cache()`: the same keys, values and logits as transformers' `DynamicCache` through a prefill,
    decode steps, a batch repeat and a row selection; its decode steps write into the buffer they already have."""
    from transformers import DynamicCache

    from probe.generation import growing_cache

    model = load_model("tiny-llama", device="cpu")
    ids = torch.randint(0, model.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))  # rows differ
    grown, plain = growing_cache(), DynamicCache()
    with torch.no_grad():
        for cache in (grown, plain):
            model.hf_model(ids, past_key_values=cache, use_cache=True)
        after_prefill = grown.layers[0]._buffers[0].data_ptr()
        for step in range(6):
            if step == 2:
                for cache in (grown, plain):
                    cache.batch_repeat_interleave(3)
            if step == 4:
                for cache in (grown, plain):
                    cache.batch_select_indices(torch.tensor([0, 3, 4]))
            token = (torch.arange(grown.layers[0].keys.shape[0]) + step + 5)[:, None]  # a token per row
            outs = [model.hf_model(token, past_key_values=cache, use_cache=True).logits for cache in (grown, plain)]
            assert torch.equal(outs[0], outs[1])
            if step < 2:  # decode steps write into the prefill's buffer
                assert grown.layers[0]._buffers[0].data_ptr() == after_prefill
    for ours, theirs in zip(grown.layers, plain.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.keys.shape[-2] == 9 + 6 and ours._buffers[0].shape[-2] > ours.keys.shape[-2]


def test_greedy_steps_shrinking_batch_drops_finished_rows_with_the_same_ids():
    """The one decode stepper: three rows from one shared prefill, fed different first tokens. With a stop id
    that ends row 1 early, the shrinking batch (finished rows leave; the context is entered anew for the
    smaller batch) gives the ids the fixed batch gives; every step sees its batch's logits."""
    from probe.generation import greedy_steps, growing_cache

    model = load_model("tiny-llama", device="cpu")
    ids = torch.randint(4, model.d_vocab, (1, 9), generator=torch.Generator().manual_seed(0))
    first = torch.tensor([[11], [12], [13]])

    def decode(stops, shrink):
        cache, batches, contexts = growing_cache(), [], []
        with torch.no_grad():
            model.hf_model(ids, past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(3)

        @contextlib.contextmanager
        def seen(active):
            contexts.append(list(active))
            yield

        new = greedy_steps(model.hf_model, cache, 6, stops, "cpu", tokens=first, rows=3, shrink=shrink,
                           context=seen, on_step=lambda step, logits: batches.append((step, logits.shape[0])))
        return new, batches, contexts

    free, batches, contexts = decode(set(), shrink=True)
    assert [len(row) for row in free] == [6, 6, 6] and len({tuple(row) for row in free}) == 3
    assert batches == [(step, 3) for step in range(6)] and contexts == [[0, 1, 2]]
    stop = free[1][2]
    expected = [row[: row.index(stop)] if stop in row else row for row in free]
    assert len(expected[1]) == 2
    fixed, fixed_batches, _ = decode({stop}, shrink=False)
    shrunk, shrunk_batches, shrunk_contexts = decode({stop}, shrink=True)
    assert fixed == shrunk == expected
    assert {size for _, size in fixed_batches} == {3}
    # a row that stopped after k tokens decoded steps 0..k (its stop was picked at step k)
    active = [(step, sum(len(row) >= step for row in expected)) for step in range(6)]
    assert shrunk_batches == [(step, n) for step, n in active if n]
    assert shrunk_contexts[0] == [0, 1, 2] and 1 not in shrunk_contexts[1]
    assert all(set(later) < set(earlier) for earlier, later in zip(shrunk_contexts, shrunk_contexts[1:]))


def test_greedy_decode_runs_the_forward_after_its_last_token():
    """`greedy_decode` (behind `LoadedModel.generate`) runs one forward per new token after the prefill, the
    last one included; from a prefill's one row the stepper continues every row alike."""
    from probe.generation import greedy_decode, greedy_steps, growing_cache

    model = load_model("tiny-llama", device="cpu")
    ids = torch.randint(4, model.d_vocab, (1, 7), generator=torch.Generator().manual_seed(1))
    calls = []
    handle = model.hf_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        new = greedy_decode(model.hf_model, ids, 4, set())
    finally:
        handle.remove()
    assert new.shape == (1, 4) and len(calls) == 1 + 4
    cache = growing_cache()
    with torch.no_grad():
        logits = model.hf_model(ids, past_key_values=cache, use_cache=True).logits
    cache.batch_repeat_interleave(2)
    rows = greedy_steps(model.hf_model, cache, 4, set(), "cpu", logits=logits, rows=2)
    assert rows == [new[0].tolist()] * 2


def test_stop_policies_and_the_chat_prompt():
    """`stop_ids`: "eos" is the end-of-sequence id; "special_and_newline" every special id and any token
    whose text holds a line break; `chat_prompt` is the tokenizer's template around one (system +) user turn."""
    from probe.prompting import chat_prompt, stop_ids
    from probe.tiny import word_tokenizer

    tokenizer = word_tokenizer()
    model = SimpleNamespace(tokenizer=tokenizer)
    assert set(stop_ids(model, "eos")) == {tokenizer.eos_token_id} == set(stop_ids(tokenizer))
    special = stop_ids(tokenizer, "special_and_newline")
    assert set(tokenizer.all_special_ids) <= set(special) and tokenizer.eos_token_id in special
    word = next(i for i in range(len(tokenizer)) if i not in special)
    assert word not in special and "\n" not in tokenizer.decode([word])
    newline = SimpleNamespace(eos_token_id=None, all_special_ids=[], decode=lambda ids: "a\nb" if ids == [7] else "a")
    assert 7 in stop_ids(newline, "special_and_newline") and 8 not in stop_ids(newline, "special_and_newline")
    assert not stop_ids(newline, "eos")
    with pytest.raises(ProbeError, match="stop policy"):
        stop_ids(tokenizer, "newline")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_prompt(tokenizer, "hi") == "<user>hi<assistant>"
    assert chat_prompt(tokenizer, "hi", system="be brief") == "<system>be brief<user>hi<assistant>"
