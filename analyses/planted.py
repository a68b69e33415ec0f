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
`probe.tiny.word_tokenizer`, so it works offline and in milliseconds. The retrieval, safety,
successor and factual builders write their weights through `probe.plant` (the architecture layer's
writing side, no Hugging Face module names here) and take `family=` (one of `probe.plant.FAMILIES`:
Llama by default, with the weights and fingerprints these models always had; GPT-NeoX, GPT-2, Qwen3,
Gemma 3) and, except factual, the planted `head=`; tests/test_planted_families.py finds each mechanism
on every one of these families.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from analyses.cdt.planted import PLANTED as INDUCTION_HEADS
from analyses.cdt.planted import induction_batch, planted_induction_model
from analyses.data.haystack import build_sample
from analyses.data.needles import Needle
from analyses.factual_planted import IN_CONTEXT_HEAD as FACTUAL_IN_CONTEXT_HEAD
from analyses.factual_planted import MEMORY_HEAD as FACTUAL_MEMORY_HEAD
from analyses.factual_planted import PLANTED_TABLE as FACTUAL_TABLE
from analyses.factual_planted import planted_factual_model
from probe import plant, tiny
from probe.architecture import architecture
from probe.heads import Head
from probe.models import LoadedModel

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
TIED_HEAD_DIM = frozenset({"gpt2", "gpt_neox"})  # d_head = d_model / n_heads, no GQA
RETRIEVAL_HEAD = Head(0, 2)   # copies the answer from the needle
RETRIEVAL_DECOY = Head(0, 3)  # attends inside the needle, one word ahead: never a copy event


def _content_slots(model: LoadedModel) -> list[int]:
    """Head dimensions where rotary barely rotates: all of them without rotary (GPT-2), the unrotated
    ones under partial rotary (GPT-NeoX), else the lowest-frequency quarter pairs (theta 1e30)."""
    rotary, d_head = architecture(model).rotary(0), model.d_head
    if rotary is None:
        return list(range(d_head))
    if rotary.dims < d_head:
        return list(range(rotary.dims, d_head))
    return list(range(d_head // 4, d_head // 2)) + list(range(3 * d_head // 4, d_head))


def retrieval_model(copy_gain: float = 20.0, family: str = "llama", head: Head = RETRIEVAL_HEAD,
                    decoy: Head = RETRIEVAL_DECOY) -> LoadedModel:
    """One-layer model (Llama: 4 query heads, 2 KV heads) whose head L0H2 (`RETRIEVAL_HEAD`) copies the needle's answer.

    Embeddings and unembedding are one-hot. The content KV head's keys/values are the token's one-hot,
    placed in head dimensions where rotary barely rotates (rope_theta 1e30; the unrotated dimensions
    under partial rotary; any without rotary), so matching is by content. Head 2's query at token x
    looks for the answer word that follows x ("Answer:" -> first answer word), and its output writes the
    attended token into the logits: greedy decoding copies the answer from the needle. Head 3
    (`RETRIEVAL_DECOY`, same KV head) looks one answer word further (inside the needle, wrong token: no
    copy event); the other heads have random queries and keys and no output. `copy_gain=0` keeps the
    attention but removes the copy (no retrieval head at all). `family` (probe.plant.FAMILIES) builds the
    same mechanism in another family (GPT-2 / GPT-NeoX: d_head 64 = d_model / 4, no GQA, learned
    positions zeroed); `head` / `decoy` move it to other heads of layer 0.
    """
    words: list[str] = []
    for word in RETRIEVAL_FILLER + tuple(RETRIEVAL_NEEDLE.fact.split()) + RETRIEVAL_TEMPLATE_WORDS:
        if word not in words:
            words.append(word)
    tokenizer = tiny.word_tokenizer(words, name="probe/planted-retrieval")
    vocab = len(tokenizer)
    if family in TIED_HEAD_DIM:  # d_head = d_model / n_heads, no GQA
        shape = plant.Shape(vocab, 256, 1, 4, 4, 64, 8, 1024, rope_theta=1e30, norm_eps=1e-6)
    else:
        shape = plant.Shape(vocab, 64, 1, 4, 2, 128, 8, 1024, rope_theta=1e30, norm_eps=1e-6)
    spec = "planted-retrieval" if family == "llama" else f"planted-retrieval-{family}"
    model = plant.new_model(family, shape, tokenizer, spec, hub_name="probe/planted-retrieval")
    d_model, head_dim = model.d_model, model.d_head
    slots = _content_slots(model)
    if vocab > len(slots):
        raise ValueError("The planted retrieval vocabulary does not fit the content-only head dimensions.")
    if head.layer != 0 or decoy.layer != 0 or head.head == decoy.head:
        raise ValueError("The planted retrieval head and its decoy are two different heads of layer 0.")
    token = tokenizer.convert_tokens_to_ids
    answer = [token(w) for w in RETRIEVAL_NEEDLE.answer.split()]
    successor = {token("Answer:"): answer[0], **dict(zip(answer, answer[1:]))}
    generator = torch.Generator().manual_seed(1)
    arch = architecture(model)
    content_kv = sorted({arch.kv_of(head.head), arch.kv_of(decoy.head)})
    random_heads = [h for h in range(model.n_heads) if h not in (head.head, decoy.head)]
    random_kv = [k for k in range(model.n_kv_heads) if k not in content_kv]
    with torch.no_grad():
        plant.set_embedding(model, torch.eye(vocab, d_model), as_added=True)
        plant.set_unembedding(model, torch.eye(vocab, d_model))
        plant.zero_positions(model)
        queries = torch.randn(len(random_heads) * head_dim, d_model, generator=generator) * 0.3
        for i, h in enumerate(random_heads):
            plant.set_q(model, 0, h, queries[i * head_dim:(i + 1) * head_dim].T)
        keys = torch.randn(len(random_kv) * head_dim, d_model, generator=generator) * 0.3
        for i, k in enumerate(random_kv):
            plant.set_k(model, 0, k, keys[i * head_dim:(i + 1) * head_dim].T)
        content = torch.zeros(d_model, head_dim)  # token t -> head dimension slots[t]
        W_O = torch.zeros(head_dim, d_model)
        for t in range(vocab):
            content[t, slots[t]] = 1.0
            W_O[slots[t], t] = copy_gain
        for k in content_kv:
            plant.set_k(model, 0, k, content)
            plant.set_v(model, 0, k, content)
        plant.set_o(model, 0, head.head, W_O)
        W_Q, W_Q_decoy = torch.zeros(d_model, head_dim), torch.zeros(d_model, head_dim)
        for x, y in successor.items():
            W_Q[x, slots[y]] = 4.0
            if y in successor:
                W_Q_decoy[x, slots[successor[y]]] = 4.0
        plant.set_q(model, 0, head.head, W_Q)
        plant.set_q(model, 0, decoy.head, W_Q_decoy)
    return model


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


def safety_model(family: str = "llama", head: Head = SAFETY_HEAD) -> LoadedModel:
    """2 layers x 4 query heads (Llama: 2 kv heads), d_model 32: only L1H2 (`SAFETY_HEAD`) reads harmful words and writes 'sorry'.

    Embeddings: dim 0 = 'harmfulness' (3 on harmful words, 0 elsewhere), dim 1 = 1 on every token
    (the query's source), small noise elsewhere. L1H2: query reads dim 1, key reads dim 0, both in the
    slowest RoPE pair (so the match does not depend on position); value = dim 0 - 0.5 dim 1 (positive
    only on a harmful word), output writes it to dim 2, which the unembedding maps to +'sorry' / -'sure'.
    Every other head writes small random noise; MLPs are off. So ablating L1H2 (uniform attention
    dilutes the harmful word; scaling removes it) moves the next-token distribution most. `family`
    builds the same mechanism in another family (probe.plant.FAMILIES; no GQA in GPT-2 / GPT-NeoX,
    whose d_head 8 is d_model / 4 too); `head` moves it to another head.
    """
    tokenizer = tiny.word_tokenizer(list(SAFETY_WORDS), name="probe/planted-refusal")
    vocab, d_model, n_heads, d_head = len(tokenizer), 32, 4, 8
    n_kv = n_heads if family in TIED_HEAD_DIM else 2
    shape = plant.Shape(vocab, d_model, 2, n_heads, n_kv, d_head, 16, 64, norm_eps=1e-6)
    spec = "tiny-planted-refusal" if family == "llama" else f"tiny-planted-refusal-{family}"
    model = plant.new_model(family, shape, tokenizer, spec, hub_name="probe/tiny-planted-refusal")
    gen = torch.Generator().manual_seed(0)
    slow = d_head // 2 - 1  # the RoPE pair with the lowest frequency (unrotated under partial rotary)
    kv = architecture(model).kv_of(head.head)
    with torch.no_grad():
        embed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        embed[:, 0] = 0.0
        embed[:, 1] = 1.0
        embed[:, 2] = 0.0
        for word in SAFETY_HARMFUL_WORDS:
            embed[tokenizer.convert_tokens_to_ids(word), 0] = 3.0
        plant.set_embedding(model, embed, as_added=True)
        for layer in range(model.n_layers):  # random heads, drawn as whole projections (row = output unit)
            q, k, v = (0.3 * torch.randn(n * d_head, d_model, generator=gen) for n in (n_heads, n_kv, n_kv))
            o = 0.05 * torch.randn(d_model, n_heads * d_head, generator=gen)
            o[:3] = 0.0  # no other head writes harmfulness, the query source or refusal
            for h in range(n_heads):
                plant.set_q(model, layer, h, q[h * d_head:(h + 1) * d_head].T)
                plant.set_o(model, layer, h, o[:, h * d_head:(h + 1) * d_head].T)
            for j in range(n_kv):
                plant.set_k(model, layer, j, k[j * d_head:(j + 1) * d_head].T)
                plant.set_v(model, layer, j, v[j * d_head:(j + 1) * d_head].T)
            plant.zero_mlp(model, layer)
        W_Q, W_K, W_V, W_O = torch.zeros(d_model, d_head), torch.zeros(d_model, d_head), \
            torch.zeros(d_model, d_head), torch.zeros(d_head, d_model)
        W_Q[1, slow] = 6.0
        W_K[0, slow] = 6.0
        W_V[0, 0] = 1.0
        W_V[1, 0] = -0.5  # without a harmful word the value is negative
        W_O[0, 2] = 8.0
        plant.set_head_qk(model, head.layer, head.head, W_Q, W_K)
        plant.set_head_ov(model, head.layer, head.head, W_V, W_O)
        unembed = 0.1 * torch.randn(vocab, d_model, generator=gen)
        unembed[:, 2] = 0.0
        unembed[tokenizer.convert_tokens_to_ids("sorry"), 2] = 4.0
        unembed[tokenizer.convert_tokens_to_ids("sure"), 2] = -4.0
        plant.set_unembedding(model, unembed)
    return model


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
    d_model, n_heads, d_head = 32, 4, 8
    shape = plant.Shape(len(tokenizer), d_model, 1, n_heads, n_heads, d_head, 32, 256)
    model = plant.new_model("llama", shape, tokenizer, "planted-duo", hub_name="probe/planted-duo", seed=3,
                            zero=False)
    with torch.no_grad():
        emb = torch.empty(len(tokenizer), d_model).normal_(0, 0.3)  # the global RNG, after the seeded init
        emb[:, :3] = 0
        emb[:, 0] = 1.0
        emb[vocab["<bos>"], 1] = 1.0
        emb[vocab["key"], 2] = 1.0
        plant.set_embedding(model, emb)
        slow = 3  # the lowest-frequency rotary pair (3, 7): RoPE barely rotates it over 60 positions
        for head, key_dim in ((DUO_HEAD.head, 2), (DUO_SINK_HEAD.head, 1)):  # keys: 'key', <bos>
            W_Q, W_K = torch.zeros(d_model, d_head), torch.zeros(d_model, d_head)
            W_Q[0, slow] = 5.0
            W_K[key_dim, slow] = 5.0
            plant.set_head_qk(model, 0, head, W_Q, W_K)
        for head in (2, 3):  # heads 2, 3: no query or key, and no value: they write nothing
            plant.set_head_qk(model, 0, head, torch.zeros(d_model, d_head), torch.zeros(d_model, d_head))
            plant.set_v(model, 0, head, torch.zeros(d_model, d_head))
        W_O = torch.empty(d_model, n_heads * d_head).normal_(0, 1.0)  # heads write as much as the embeddings carry
        for head in range(n_heads):
            plant.set_o(model, 0, head, W_O[:, head * d_head:(head + 1) * d_head].T)
        plant.zero_mlp(model, 0, out_only=True)
    return model


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


def successor_model(wrap_around: bool = False, family: str = "llama", head: Head = SUCCESSOR_HEAD) -> LoadedModel:
    """Tiny GQA Llama whose head L1H3 (`SUCCESSOR_HEAD`) rotates each task's circle by one step: succ(t) always wins.

    Each task variant k (prefixes share the plane of their full names) gets a plane (dims 2k,
    2k+1); item p of n sits at angle 2*pi*p/n there. MLP0 is made linear so that e(t) is W_E[t] up to
    a positive scale: in a gated MLP a constant coordinate (dim 127) drives SwiGLU's gate to ~20 for
    every token; in a plain MLP (GPT-2, GPT-NeoX) a bias of 40 puts GELU in its linear range and the
    output bias takes it back out, and dim 127 instead makes every embedding sum to zero (LayerNorm's
    centring is then the identity). The head's value map copies plane k into head dims (2k, 2k+1) and
    its output map rotates them by 2*pi/n_k back into plane k; the unembedding of u is its own circle
    point. Every other weight keeps its seeded random init. `family` (probe.plant.FAMILIES) builds it in
    another family (no GQA in GPT-2 / GPT-NeoX); `head` moves the planted head (layer 1 or later).
    """
    from analyses.data.succession import build_tasks

    tokenizer = tiny.word_tokenizer()
    vocab, d, d_mlp, n_heads = len(tokenizer), 128, 128, 4
    n_kv = n_heads if family in TIED_HEAD_DIM else 2
    dh = d // n_heads
    shape = plant.Shape(vocab, d, 2, n_heads, n_kv, dh, d_mlp, 256)
    spec = "tiny-planted-successor" if family == "llama" else f"tiny-planted-successor-{family}"
    model = plant.new_model(family, shape, tokenizer, spec, hub_name="probe/tiny-planted", seed=3, zero=False)
    if head.layer < 1:
        raise ValueError("The planted successor head reads e(t) after MLP0: put it in layer 1 or later.")
    arch = architecture(model)
    kv = arch.kv_of(head.head)
    gated = arch.mlp(0).kind == "gated"
    tasks = build_tasks(tokenizer, wrap_around=wrap_around).tasks
    with torch.no_grad():
        W_E = torch.randn(vocab, d) * 0.02
        W_E[:, d - 1] = 1.0
        W_V, W_O = torch.zeros(d, dh), torch.zeros(dh, d)
        planes: dict[tuple[str, str], int] = {}
        for task in tasks:  # "May" is a month and a month prefix: prefixes share their task's plane
            key = (task.task.replace("day_prefixes", "days").replace("month_prefixes", "months"), task.variant)
            k = planes.setdefault(key, len(planes))
            n = len(task.token_ids)
            for p, token in enumerate(task.token_ids):
                W_E[token, :d - 1] = 0.0
                W_E[token, 2 * k] = math.cos(2 * math.pi * p / n)
                W_E[token, 2 * k + 1] = math.sin(2 * math.pi * p / n)
            W_V[2 * k, 2 * k] = 1.0
            W_V[2 * k + 1, 2 * k + 1] = 1.0
            phi = 2 * math.pi / n  # out = v @ R, R = [[c, s], [-s, c]]
            c, s = math.cos(phi), math.sin(phi)
            W_O[2 * k, 2 * k], W_O[2 * k, 2 * k + 1] = c, s
            W_O[2 * k + 1, 2 * k], W_O[2 * k + 1, 2 * k + 1] = -s, c
        if not gated:  # zero-sum embeddings: LayerNorm's centring leaves them as they are
            W_E[:, d - 1] = 0.0
            W_E[:, d - 1] = -W_E.sum(-1)
        plant.set_head_ov(model, head.layer, head.head, W_V, W_O)
        plant.set_embedding(model, W_E, as_added=True)
        plant.set_unembedding(model, W_E)
        if gated:
            W_gate = torch.zeros(d, d_mlp)
            W_gate[d - 1] = 2.5                         # RMS-normed constant coordinate is 8 -> gate 20
            plant.set_mlp(model, 0, torch.eye(d, d_mlp), torch.eye(d_mlp, d) / (20.0 * 8.0), W_gate=W_gate)
        else:
            offset = torch.full((d_mlp,), 40.0)         # GELU(h + 40) = h + 40 for |h| << 40
            W_out = torch.eye(d_mlp, d) / 8.0
            plant.set_mlp(model, 0, torch.eye(d, d_mlp), W_out, b_in=offset, b_out=-(offset @ W_out))
        plant.reset_norms(model)
    return model


# ---- factual recall: in-context copy head vs memory head -------------------------------------------

def factual_model(copy_gain: float = 3.0, memory_gain: float = 2.0, family: str = "llama") -> LoadedModel:
    """Planted factual-recall model (`analyses.factual_planted`): `FACTUAL_IN_CONTEXT_HEAD` (L1H0) copies
    the context city, `FACTUAL_MEMORY_HEAD` (L1H1) writes the memorised capital of `FACTUAL_TABLE`.
    With copy_gain > memory_gain the model answers in context; attribution: L1H0 > 0, L1H1 < 0."""
    return planted_factual_model(copy_gain=copy_gain, memory_gain=memory_gain, family=family)
