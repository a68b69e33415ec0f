"""The planted successor model: a head that rotates each ordinal sequence one step."""

from __future__ import annotations

import math

import torch

from analyses.planted.families import TIED_HEAD_DIM
from probe import plant, tiny
from probe.architecture import architecture
from probe.heads import Head
from probe.models import LoadedModel

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
