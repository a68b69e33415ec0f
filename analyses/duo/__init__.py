"""DuoAttention (Xiao et al. 2024): learned per-KV-head gates between full and streaming attention.

With the model frozen, every KV head g of layer l gets a gate α[l, g] ∈ [0, 1]; the student's query
heads of that group output z = α·z_full + (1 − α)·z_stream before the output projection, as the
authors' two-way forward does: z_full is the frozen teacher's (full attention on the teacher's own
hidden states, no gradient), z_stream the student's attention restricted to the attention sink ∪
recent window, on the student's states, so drift builds up only through streaming heads. The loss is
the mean squared distance between the student's and the teacher's hidden states after the final norm
(weight included, `probe.readout.apply_final_norm`) on the answer tokens of a fresh synthetic multi-passkey
prompt at every step, plus λ·mean|α|. Deployment keeps the top fraction of KV heads (global quantile)
as retrieval heads and restricts the rest to sink + recent; we evaluate NIAH accuracy in a labelled
regime against full attention and against random streaming sets of the same size.

Scaled to the CPU (spec §8): contexts of a few hundred tokens, 3 passkeys of 8 NATO words, exact
token windows (sink 16 / recent 64) in training and deployment, a wall-clock budget on training.

Submodules: config (settings, result, error), passkeys (training prompts), gates (the gated student
and its training), deployment (binary gates, KV-cache size), niah (evaluation and agreement with
baselines), pipeline (`run`), plots (figures and summary).
"""

from analyses.duo.config import QUICK, VERSION, DuoConfig, DuoError, DuoResult
from analyses.duo.deployment import binarise, kv_cache_bytes, streaming_heads
from analyses.duo.gates import distillation_states, gate_hooks, train_gates
from analyses.duo.niah import niah_accuracy
from analyses.duo.passkeys import PasskeySample
from analyses.duo.pipeline import run
from analyses.duo.plots import figures, summary

__all__ = ["VERSION", "QUICK", "DuoConfig", "DuoResult", "DuoError", "PasskeySample", "train_gates",
           "distillation_states", "gate_hooks", "binarise", "streaming_heads", "kv_cache_bytes", "niah_accuracy", "run", "figures", "summary"]
