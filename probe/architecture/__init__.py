"""The architecture layer: every family fact an analyzer needs, asked of one object.

`architecture(model)` reads a loaded model through the TransformerLens 4 bridge's own per-family
adapter (its component names are the same for every family: `embed`, `blocks[l].ln1 / ln2 /
ln1_post / ln2_post / attn (q, k, v, qkv, o, q_norm, k_norm) / mlp`, `ln_final`, `unembed`) and the
stacked per-head weights the bridge exposes (`W_Q` ... `W_O`, packed projections already split),
and adds what the bridge lacks:

- norms as values (kind, eps, effective weight with Gemma's `1 + w` offset detected, placement:
  pre / post / both, QK-norm per head or over the whole projection), applied exactly by the
  Hugging Face module;
- rotary facts (rotated dimensions for partial rotary, theta) and the model's own cos/sin tables per
  layer type (`rotary_key`, `rotary_tables`), the attention scale, soft-caps and sliding windows per
  layer, attention variants the stacked weights do not describe (`unsupported_attention`), parallel
  vs sequential blocks;
- the MLP of a layer as a callable on any `[..., d_model]` tensor (gated, plain or MoE: MoE blocks
  want `[batch, pos, d]` and some return `(hidden, router_logits)`; the callable hides both), and as
  tensors (`Mlp.dense_weights`: the projections and activation; `Mlp.moe_weights`: router and experts);
- the embedding as the model adds it to the residual (scale included), learned positions (`W_pos`),
  unembedding columns of a few tokens (never the full vocabulary), and each component's Hugging Face
  module path, so a test can find the same module in an independently loaded copy.

Modules are the Hugging Face originals under the bridge's wrappers: norms and the embedding run
without any bridge hook. An MLP's inner projections are the bridge's linear components (the bridge
swaps them into the HF module), so hooks on `blocks.{l}.mlp.*` fire inside `mlp(layer)(x)`: call it
holding `model.lock`, as a forward does. A component the family does not have, that an analyzer asks
for, raises `MissingComponentError` naming it. The writing side is `probe.plant`.

`components` holds the values (`Norm`, `Rotary`, `Attention`, `Mlp`, `MlpWeights`, `MoeWeights`) and the
errors; `reader` the `Architecture` that reads them.
"""

from probe.architecture.components import (
    ATTN_NORMS,
    BLOCK_NORMS,
    ArchitectureError,
    Attention,
    MissingComponentError,
    Mlp,
    MlpWeights,
    MoeWeights,
    Norm,
    Rotary,
    hf_module,
)
from probe.architecture.reader import Architecture, architecture

__all__ = ["ATTN_NORMS", "BLOCK_NORMS", "Architecture", "ArchitectureError", "Attention", "MissingComponentError",
           "Mlp", "MlpWeights", "MoeWeights", "Norm", "Rotary", "architecture", "hf_module"]
