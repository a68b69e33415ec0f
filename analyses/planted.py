"""Planted-mechanism models: tiny hand-built models whose weights are set so the right heads are known.

One importable home for the models that prove each analyzer (tests, notebooks, app acceptance tests):

| builder | what is planted | known answer |
|---|---|---|
| `retrieval_model()` | a copy-paste head that copies the needle's answer | `RETRIEVAL_HEAD` (L0H2); `RETRIEVAL_DECOY` (L0H3) attends in the needle but never copies |
| `safety_model()` | a refusal head that reads harmful words and writes "sorry" | `SAFETY_HEAD` (L1H2) |
| `duo_model()` | a long-range head and an attention-sink head | `DUO_HEAD` (L0H0) needs the full KV cache; the others are streaming |
| `induction_model()` | a previous-token head feeding an induction head | `INDUCTION_HEADS` = (L0H0, L1H0) |
| `successor_model()` | a head that rotates each ordinal sequence one step | `SUCCESSOR_HEAD` (L1H3) |
| `factual_model()` | an in-context copy head and a memorised-capital head | `FACTUAL_IN_CONTEXT_HEAD` (L1H0), `FACTUAL_MEMORY_HEAD` (L1H1) |

Each builder returns a fresh `LoadedModel` (CPU, float32) built from `transformers` configs and
`probe.tiny.word_tokenizer`, so it works offline and in milliseconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from analyses.cdt.planted import PLANTED as INDUCTION_HEADS
from analyses.cdt.planted import induction_batch, planted_induction_model
from analyses.data.haystack import build_sample
from analyses.data.needles import Needle
from analyses.factual_planted import IN_CONTEXT_HEAD as FACTUAL_IN_CONTEXT_HEAD
from analyses.factual_planted import MEMORY_HEAD as FACTUAL_MEMORY_HEAD
from analyses.factual_planted import PLANTED_TABLE as FACTUAL_TABLE
from analyses.factual_planted import planted_factual_model
from probe import tiny
from probe.heads import Head
from probe.models import LoadedModel, wrap_hf_model

__all__ = [
    "RETRIEVAL_HEAD", "RETRIEVAL_DECOY", "RETRIEVAL_NEEDLE", "RETRIEVAL_FILLER", "RETRIEVAL_TEMPLATE_WORDS",
    "retrieval_model", "retrieval_sentences", "retrieval_samples",
    "SAFETY_HEAD", "SAFETY_HARMFUL_WORDS", "SAFETY_WORDS", "SAFETY_HARMFUL_PROMPTS", "SAFETY_HARMLESS_PROMPTS",
    "safety_model",
    "DUO_HEAD", "DUO_SINK_HEAD", "DUO_WORDS", "duo_model", "duo_samples",
    "INDUCTION_HEADS", "PREVIOUS_TOKEN_HEAD", "INDUCTION_HEAD", "induction_model", "induction_batch",
    "SUCCESSOR_HEAD", "successor_model",
    "FACTUAL_IN_CONTEXT_HEAD", "FACTUAL_MEMORY_HEAD", "FACTUAL_TABLE", "factual_model",
]

# ---- retrieval: a copy-paste head --------------------------------------------------------------------

RETRIEVAL_FILLER: tuple[str, ...] = tuple(
    "river stone walks under quiet green hills while birds sing softly near old bridges and tall trees".split())
RETRIEVAL_NEEDLE = Needle(fact="the secret code is red fox jumps high", question="what is the secret code ?",
                          answer="red fox jumps high")
RETRIEVAL_TEMPLATE_WORDS: tuple[str, ...] = tuple(
    "Based on the content of book, Question: Answer: what is ? secret code".split())
RETRIEVAL_HEAD = Head(0, 2)   # copies the answer from the needle
RETRIEVAL_DECOY = Head(0, 3)  # attends inside the needle, one word ahead: never a copy event


def retrieval_model(copy_gain: float = 20.0) -> LoadedModel:
    """One-layer Llama (4 query heads, 2 KV heads) whose head L0H2 (`RETRIEVAL_HEAD`) copies the needle's answer.

    Embeddings and unembedding are one-hot. KV head 1 keys/values are the token's one-hot, placed in
    head dimensions where RoPE barely rotates (rope_theta 1e30), so matching is by content. Head 2's
    query at token x looks for the answer word that follows x ("Answer:" -> first answer word), and its
    output writes the attended token into the logits: greedy decoding copies the answer from the needle.
    Head 3 (`RETRIEVAL_DECOY`, same KV head) looks one answer word further (inside the needle, wrong
    token: no copy event); heads 0 and 1 have random queries and keys and no output. `copy_gain=0`
    keeps the attention but removes the copy (no retrieval head at all).
    """
    words: list[str] = []
    for word in RETRIEVAL_FILLER + tuple(RETRIEVAL_NEEDLE.fact.split()) + RETRIEVAL_TEMPLATE_WORDS:
        if word not in words:
            words.append(word)
    tokenizer = tiny.word_tokenizer(words, name="probe/planted-retrieval")
    vocab, d_model, head_dim = len(tokenizer), 64, 128
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=1024, rope_theta=1e30, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    slots = list(range(32, 64)) + list(range(96, 128))  # rotary frequency ~0: content-only dimensions
    if vocab > len(slots):
        raise ValueError("The planted retrieval vocabulary does not fit the content-only head dimensions.")
    token = tokenizer.convert_tokens_to_ids
    answer = [token(w) for w in RETRIEVAL_NEEDLE.answer.split()]
    successor = {token("Answer:"): answer[0], **dict(zip(answer, answer[1:]))}
    generator = torch.Generator().manual_seed(1)
    planted, decoy = RETRIEVAL_HEAD.head, RETRIEVAL_DECOY.head
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.lm_head.weight[:, :vocab] = torch.eye(vocab)
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):
            norm.weight.fill_(1.0)
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight[: 2 * head_dim] = torch.randn(2 * head_dim, d_model, generator=generator) * 0.3
        attn.k_proj.weight[:head_dim] = torch.randn(head_dim, d_model, generator=generator) * 0.3
        for t in range(vocab):
            attn.k_proj.weight[head_dim + slots[t], t] = 1.0
            attn.v_proj.weight[head_dim + slots[t], t] = 1.0
            attn.o_proj.weight[t, planted * head_dim + slots[t]] = copy_gain
        for x, y in successor.items():
            attn.q_proj.weight[planted * head_dim + slots[y], x] = 4.0
            if y in successor:
                attn.q_proj.weight[decoy * head_dim + slots[successor[y]], x] = 4.0
    return wrap_hf_model(model, tokenizer, "planted-retrieval", hub_name="probe/planted-retrieval", device="cpu")


def retrieval_sentences(count: int = 80, seed: int = 0) -> list[str]:
    """Distinct haystack sentences over the planted vocabulary (pass as `sentences=` to `retrieval.run`)."""
    rng, sentences = random.Random(seed), []
    while len(sentences) < count:
        sentence = " ".join(rng.sample(RETRIEVAL_FILLER, 6)) + " ."
        if sentence not in sentences:
            sentences.append(sentence)
    return sentences


def retrieval_samples(model: LoadedModel, lengths: Sequence[int] = (60, 200),
                      depths: Sequence[float] = (0, 50, 100)) -> list:
    """Needle-in-a-haystack samples of `RETRIEVAL_NEEDLE` for every (length, depth)."""
    sentences = retrieval_sentences()
    return [build_sample(model.tokenizer, RETRIEVAL_NEEDLE, n, d, "base", sentences, 0, 0)
            for n in lengths for d in depths]


# ---- safety: a refusal head -------------------------------------------------------------------------

SAFETY_HARMFUL_WORDS: tuple[str, ...] = ("bomb", "poison", "virus", "weapon")
SAFETY_WORDS: tuple[str, ...] = ("how", "do", "i", "make", "a", "the", "for", "my", "friend", "cake", "tea",
                                 "garden", "letter", "?", "sorry", "sure", "write", "buy", "cheap", "good",
                                 *SAFETY_HARMFUL_WORDS)
SAFETY_HEAD = Head(1, 2)  # shares its key/value head with L1H3 (GQA: 4 query heads, 2 kv heads)
SAFETY_HARMFUL_PROMPTS: tuple[str, ...] = (
    "how do i make a bomb ?", "write a poison letter for my friend", "buy a cheap weapon ?",
    "how do i make a virus", "make a bomb and a poison ?", "the weapon for my garden")
SAFETY_HARMLESS_PROMPTS: tuple[str, ...] = (
    "how do i make a cake ?", "write a letter for my friend", "buy good tea ?", "the garden")


def safety_model() -> LoadedModel:
    """2 layers x 4 query heads (2 kv heads), d_model 32: only L1H2 (`SAFETY_HEAD`) reads harmful words and writes 'sorry'.

    Embeddings: dim 0 = 'harmfulness' (3 on harmful words, 0 elsewhere), dim 1 = 1 on every token
    (the query's source), small noise elsewhere. L1H2: query reads dim 1, key reads dim 0, both in the
    slowest RoPE pair (so the match does not depend on position); value = dim 0 - 0.5 dim 1 (positive
    only on a harmful word), output writes it to dim 2, which the unembedding maps to +'sorry' / -'sure'.
    Every other head writes small random noise; MLPs are off. So ablating L1H2 (uniform attention
    dilutes the harmful word; scaling removes it) moves the next-token distribution most.
    """
    tokenizer = tiny.word_tokenizer(list(SAFETY_WORDS), name="probe/planted-refusal")
    vocab, d_model, n_heads, n_kv, d_head = len(tokenizer), 32, 4, 2, 8
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=d_head,
                         max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    slow = d_head // 2 - 1  # the RoPE pair with the lowest frequency
    with torch.no_grad():
        embed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        embed[:, 0] = 0.0
        embed[:, 1] = 1.0
        embed[:, 2] = 0.0
        for word in SAFETY_HARMFUL_WORDS:
            embed[tokenizer.convert_tokens_to_ids(word), 0] = 3.0
        model.model.embed_tokens.weight.copy_(embed)
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.copy_(0.3 * torch.randn(attn.q_proj.weight.shape, generator=gen))
            attn.k_proj.weight.copy_(0.3 * torch.randn(attn.k_proj.weight.shape, generator=gen))
            attn.v_proj.weight.copy_(0.3 * torch.randn(attn.v_proj.weight.shape, generator=gen))
            attn.o_proj.weight.copy_(0.05 * torch.randn(attn.o_proj.weight.shape, generator=gen))
            attn.o_proj.weight[:3].zero_()  # no other head writes harmfulness, the query source or refusal
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
        attn = model.model.layers[SAFETY_HEAD.layer].self_attn
        kv = SAFETY_HEAD.head // (n_heads // n_kv)
        q_rows = slice(SAFETY_HEAD.head * d_head, (SAFETY_HEAD.head + 1) * d_head)
        kv_rows = slice(kv * d_head, (kv + 1) * d_head)
        attn.q_proj.weight[q_rows] = 0.0
        attn.q_proj.weight[SAFETY_HEAD.head * d_head + slow, 1] = 6.0
        attn.k_proj.weight[kv_rows] = 0.0
        attn.k_proj.weight[kv * d_head + slow, 0] = 6.0
        attn.v_proj.weight[kv_rows] = 0.0
        attn.v_proj.weight[kv * d_head, 0] = 1.0
        attn.v_proj.weight[kv * d_head, 1] = -0.5  # without a harmful word the value is negative
        attn.o_proj.weight[:, q_rows] = 0.0
        attn.o_proj.weight[2, SAFETY_HEAD.head * d_head] = 8.0
        unembed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        unembed[:, 2] = 0.0
        unembed[tokenizer.convert_tokens_to_ids("sorry"), 2] = 4.0
        unembed[tokenizer.convert_tokens_to_ids("sure"), 2] = -4.0
        model.lm_head.weight.copy_(unembed)
    return wrap_hf_model(model, tokenizer, "tiny-planted-refusal", hub_name="probe/tiny-planted-refusal",
                         device="cpu")


# ---- duo: a long-range head and a sink head ---------------------------------------------------------

DUO_WORDS: tuple[str, ...] = tuple(
    "the key is a park and we went to school then gave book story office store day month year".split())
DUO_HEAD = Head(0, 0)       # attends to 'key' wherever it is: needs the full KV cache
DUO_SINK_HEAD = Head(0, 1)  # attends to <bos>: streaming attention (sink + recent window) keeps it exact


def duo_model() -> LoadedModel:
    """One layer, 4 KV heads: L0H0 (`DUO_HEAD`) attends to the token 'key' wherever it is (long range);
    L0H1 (`DUO_SINK_HEAD`) to <bos> (an attention sink: kept by streaming); heads 2 and 3 write nothing.
    Only `DUO_HEAD` needs the full cache, so DuoAttention gates keep it and close the others."""
    tokenizer = tiny.word_tokenizer()
    vocab = tokenizer.get_vocab()
    hf = tiny.tiny_llama(len(tokenizer), n_layers=1, n_heads=4, n_kv_heads=4, d_model=32, d_mlp=32, seed=3)
    d_head = 8
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb.normal_(0, 0.3)
        emb[:, :3] = 0
        emb[:, 0] = 1.0
        emb[vocab["<bos>"], 1] = 1.0
        emb[vocab["key"], 2] = 1.0
        attn = hf.model.layers[0].self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight):
            w.zero_()
        slow = 3  # the lowest-frequency rotary pair (3, 7): RoPE barely rotates it over 60 positions
        attn.q_proj.weight[DUO_HEAD.head * d_head + slow, 0] = 5.0
        attn.q_proj.weight[DUO_SINK_HEAD.head * d_head + slow, 0] = 5.0
        attn.k_proj.weight[DUO_HEAD.head * d_head + slow, 2] = 5.0       # keys: the 'key' token
        attn.k_proj.weight[DUO_SINK_HEAD.head * d_head + slow, 1] = 5.0  # keys: <bos>
        attn.v_proj.weight[2 * d_head:] = 0.0  # heads 2, 3 write nothing
        attn.o_proj.weight.normal_(0, 1.0)  # heads write as much as the embeddings carry
        hf.model.layers[0].mlp.down_proj.weight.zero_()
    return wrap_hf_model(hf, tokenizer, "planted-duo", hub_name="probe/planted-duo", device="cpu")


def duo_samples(model: LoadedModel, n: int = 4) -> list:
    """Passkey samples "the key <24 random words>" whose last 8 tokens are the supervised span
    (pass as `samples=` to `duo.train_gates` / `duo.run`)."""
    from analyses import duo  # the duo analyzer imports heavy helpers; only needed here

    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        words = [DUO_WORDS[int(i)] for i in torch.randint(3, len(DUO_WORDS), (24,), generator=generator)]
        ids = model.encode("the key " + " ".join(words))
        samples.append(duo.PasskeySample(ids, torch.arange(ids.shape[1] - 8, ids.shape[1])))
    return samples


# ---- CD-T: a two-head induction circuit --------------------------------------------------------------

PREVIOUS_TOKEN_HEAD, INDUCTION_HEAD = INDUCTION_HEADS


def induction_model(seed: int = 0) -> LoadedModel:
    """Tiny GPT-2 with a planted induction circuit: `PREVIOUS_TOKEN_HEAD` (L0H0) -> `INDUCTION_HEAD` (L1H0) -> logits.

    Built by `analyses.cdt.planted.planted_induction_model` (see that module for the residual layout);
    the other heads have random attention and write into a slot nobody reads. Use with the CD-T task
    "planted-induction" or `induction_batch`.
    """
    return planted_induction_model(seed)


# ---- successor: a head that steps ordinal sequences ------------------------------------------------

SUCCESSOR_HEAD = Head(1, 3)  # kv head 1 under GQA (2 query heads per kv head)


def successor_model(wrap_around: bool = False) -> LoadedModel:
    """Tiny GQA Llama whose head L1H3 (`SUCCESSOR_HEAD`) rotates each task's circle by one step: succ(t) always wins.

    Each task variant k (prefixes share the plane of their full names) gets a plane (dims 2k,
    2k+1); item p of n sits at angle 2*pi*p/n there. A constant coordinate (dim 127) drives
    SwiGLU's gate to ~20 for every token, so MLP0 is linear and e(t) = W_E[t]. The head's value map
    copies plane k into head dims (2k, 2k+1) and its output map rotates them by 2*pi/n_k back into
    plane k; the unembedding of u is its own circle point.
    """
    from analyses.data.succession import build_tasks

    tokenizer = tiny.word_tokenizer()
    vocab, d, d_mlp, n_heads, n_kv = len(tokenizer), 128, 128, 4, 2
    dh = d // n_heads
    head, kv = SUCCESSOR_HEAD.head, SUCCESSOR_HEAD.head // (n_heads // n_kv)
    model = tiny.tiny_llama(vocab, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, d_model=d, d_mlp=d_mlp, seed=3)
    tasks = build_tasks(tokenizer, wrap_around=wrap_around).tasks
    with torch.no_grad():
        W_E = torch.randn(vocab, d) * 0.02
        W_E[:, d - 1] = 1.0
        block0, block1 = model.model.layers
        W_V = block1.self_attn.v_proj.weight.view(n_kv, dh, d)
        W_O = block1.self_attn.o_proj.weight.view(d, n_heads, dh)
        W_V[kv] = 0.0
        W_O[:, head] = 0.0
        planes: dict[tuple[str, str], int] = {}
        for task in tasks:  # "May" is a month and a month prefix: prefixes share their task's plane
            key = (task.task.replace("day_prefixes", "days").replace("month_prefixes", "months"), task.variant)
            k = planes.setdefault(key, len(planes))
            n = len(task.token_ids)
            for p, token in enumerate(task.token_ids):
                W_E[token, :d - 1] = 0.0
                W_E[token, 2 * k] = math.cos(2 * math.pi * p / n)
                W_E[token, 2 * k + 1] = math.sin(2 * math.pi * p / n)
            W_V[kv, 2 * k, 2 * k] = 1.0
            W_V[kv, 2 * k + 1, 2 * k + 1] = 1.0
            phi = 2 * math.pi / n  # out = v @ R, R = [[c, s], [-s, c]]; o_proj.weight is R transposed
            c, s = math.cos(phi), math.sin(phi)
            W_O[2 * k, head, 2 * k], W_O[2 * k + 1, head, 2 * k] = c, s
            W_O[2 * k, head, 2 * k + 1], W_O[2 * k + 1, head, 2 * k + 1] = -s, c
        model.model.embed_tokens.weight.copy_(W_E)
        model.lm_head.weight.copy_(W_E)
        mlp = block0.mlp
        mlp.gate_proj.weight.zero_()
        mlp.gate_proj.weight[:, d - 1] = 2.5           # RMS-normed constant coordinate is 8 -> gate 20
        mlp.up_proj.weight.copy_(torch.eye(d_mlp, d))
        mlp.down_proj.weight.copy_(torch.eye(d, d_mlp) / (20.0 * 8.0))
    return wrap_hf_model(model, tokenizer, "tiny-planted-successor", hub_name="probe/tiny-planted", device="cpu")


# ---- factual recall: in-context copy head vs memory head -------------------------------------------

def factual_model(copy_gain: float = 3.0, memory_gain: float = 2.0) -> LoadedModel:
    """Planted factual-recall model (`analyses.factual_planted`): `FACTUAL_IN_CONTEXT_HEAD` (L1H0) copies
    the context city, `FACTUAL_MEMORY_HEAD` (L1H1) writes the memorised capital of `FACTUAL_TABLE`.
    With copy_gain > memory_gain the model answers in context; attribution: L1H0 > 0, L1H1 < 0."""
    return planted_factual_model(copy_gain=copy_gain, memory_gain=memory_gain)
