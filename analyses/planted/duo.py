"""The planted DuoAttention model: a long-range head that needs the full KV cache and an attention-sink head."""

from __future__ import annotations

import torch

from probe import plant, tiny
from probe.heads import Head
from probe.models import LoadedModel

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
