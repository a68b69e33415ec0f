"""The planted retrieval model: a copy-paste head that copies the needle's answer, and a decoy head."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from analyses.data.haystack import build_sample
from analyses.data.needles import Needle
from analyses.planted.families import TIED_HEAD_DIM
from probe import plant, tiny
from probe.architecture import architecture
from probe.heads import Head
from probe.models import LoadedModel

RETRIEVAL_FILLER: tuple[str, ...] = tuple(
    "river stone walks under quiet green hills while birds sing softly near old bridges and tall trees".split())
RETRIEVAL_NEEDLE = Needle(fact="the secret code is red fox jumps high", question="what is the secret code ?",
                          answer="red fox jumps high")
RETRIEVAL_TEMPLATE_WORDS: tuple[str, ...] = tuple(
    "Based on the content of book, Question: Answer: what is ? secret code".split())
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
