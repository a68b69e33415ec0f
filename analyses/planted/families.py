"""Family traits the planted builders share."""

from __future__ import annotations

TIED_HEAD_DIM = frozenset({"gpt2", "gpt_neox"})  # d_head = d_model / n_heads, no GQA
