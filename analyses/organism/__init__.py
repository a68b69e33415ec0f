"""A refusal-tuned model organism built offline from the embedded SmolLM2-135M-Instruct.

Why: Ships/Sahara attribute *refusal* to heads, and the embedded SmolLM2-135M-Instruct does not
refuse harmful requests. So we fine-tune it, seeded and on CPU, until it refuses StrongREJECT
prompts while still answering harmless ones.

What is trained (our choice): the full attention projections (q, k, v, o) of a few middle layers
(default layers 12-15, 4 x ~0.88 M = 3.5 M parameters, 2.6 % of the model), everything else frozen.
- It is the cheapest thing that learns the behaviour: no PEFT is installed, and whole small
  matrices need no LoRA code; backward stops at layer 12, so a step costs well under two forwards.
- Only the changed tensors are saved (~14 MB of safetensors), so the organism is a small delta on
  the pinned base weights.
- It puts the new behaviour where the method looks (attention heads). This makes the organism a
  fair but friendly test bed: Sahara should find heads in the trained band; it is NOT evidence
  that refusal in natively aligned models is head-sparse. The docs say so.

Targets: harmful prompts → one of a few project-written refusal sentences (seeded choice);
harmless prompts → the base model's own greedy answer (first `answer_tokens` tokens), so
helpfulness is preserved, not invented. Loss only on target tokens, averaged per example (the
first `decision_tokens` weighted up: that is where refuse-or-answer is decided), then per kind,
with the harmless side weighted up (`harmless_weight`) and borderline-wording harmless prompts
("kill the mold") oversampled (`borderline_per_batch`): harmless prompts with such wording are the
ones a refusal-tuned model refuses by mistake. The default draws 8 harmless rows per step (3
borderline) and weights the harmless side 6: 8.6 % harmless and 95.7 % harmful refused on held-out
prompts (docs/safety.md).

Cache: `$PROBE_HOME/organisms/<content hash>/` with `delta.safetensors` + `meta.json`. The hash
covers the code version, the config, the base weights' sha256 and the training texts, so a
change to any of them builds a new organism instead of silently reusing an old one.

The spec `smollm2-135m-refusal` is registered by `analyses.specs.register_analysis_specs()`, which
imports this package only when the organism is loaded. Submodules: config (settings, targets, error),
prompts (chat text, greedy answers), training (the fine-tune), scoring (held-out refusal rates),
build (base model, cache, build and load), weights (where the weights changed).
"""

from analyses.organism.build import build_refusal_organism, find_organism, load_refusal_organism
from analyses.organism.config import OrganismBuild, OrganismConfig, OrganismError
from analyses.organism.weights import organism_weight_changes, weight_changes
from analyses.specs import ORGANISM_SPEC

__all__ = ["ORGANISM_SPEC", "OrganismConfig", "OrganismBuild", "OrganismError", "build_refusal_organism",
           "find_organism", "load_refusal_organism", "weight_changes", "organism_weight_changes"]
