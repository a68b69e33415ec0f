"""Ships / Sahara on every family of tests/support/families.py, what tests/families/test_architectures_analyzers.py's "safety Ships" cell
does not cover: the dataset-level states from the partial forward (probe.forward) == full ablated passes,
the Sahara step's angles == angles of full passes, and the first-order screen's closed-form change of z ==
what the UA / SC hooks do (sliding windows included). Cells go to the proof matrix (tests/support/matrix.py)."""

from __future__ import annotations

import torch

from analyses import safety as S
from analyses.safety.dataset_level import dataset_states, subspace_angle
from analyses.safety.readouts import ablate
from analyses.safety.ships import ablated_z_delta
from matrix import record
from probe.architecture import architecture
from probe.heads import Head
from probe.interventions import intervene

PROMPTS = ("the capital of mary is the book of john and the key", "a secret number 12 is the answer to the park",
           "the key to the country is a book")
ATOL = 1e-4
ANGLE_TOL = 1e-3  # degrees


def test_dataset_states_from_the_partial_forward_equal_full_passes(family):
    """Final-norm last-position states of ablated rows (single heads in each layer, a two-layer group, UA and
    SC) from the cached residual == one batched full pass per chunk."""
    name, model = family
    prompts = [model.encode(p) for p in PROMPTS[:2]]
    groups = [[Head(0, 1)], [Head(1, 3)], [Head(2, 0)], [Head(1, 2), Head(2, 3)]]
    worst, moved = 0.0, 0.0
    for ablation, chosen in (("query", groups), ("output", groups[1:])):
        base, fast = dataset_states(model, prompts, chosen, ablation, 1e-5, batch_rows=3)
        _, slow = dataset_states(model, prompts, chosen, ablation, 1e-5, batch_rows=3, fast=False)
        worst = max(worst, float((fast - slow).abs().max()))
        moved = max(moved, float((slow - base).abs().max()))
    assert moved > 1e-3  # the ablations change the states
    assert record(name, "safety dataset states", worst) <= ATOL


def test_sahara_step_angles_equal_full_pass_angles(family):
    """A two-step Sahara run (centred states: random weights give uncentred angles of ~0.01 degrees); every
    candidate's angle at step 1 (and the pick and two others at step 2) == the angle of the states from
    full ablated passes, and the first pick is the argmax of those reference angles. Three prompts: centred, two would leave one direction."""
    name, model = family
    prompts = [model.encode(p) for p in PROMPTS]
    steps = S.sahara(model, prompts, size=2, ablation="query", epsilon=1e-5, center=True, batch_rows=6)
    worst, peak = 0.0, 0.0
    group: list[Head] = []
    for number, step in enumerate(steps):
        options = [h for h in model.all_heads() if h not in group]
        if number:  # step 2: its pick and two other candidates (time)
            options = [step.head] + [h for h in options if h != step.head][:2]
        base, ablated = dataset_states(model, prompts, [group + [h] for h in options], "query", 1e-5, fast=False)
        reference = subspace_angle(base, ablated, center=True)
        fast = torch.tensor([step.candidate_scores[str(h)] for h in options])
        worst = max(worst, float((fast - reference).abs().max()))
        peak = max(peak, float(reference.max()))
        best = int(torch.argmax(reference))
        margin = float(reference[best] - reference.topk(2).values[1])
        if margin > 2 * ANGLE_TOL and not number:
            assert step.head == options[best]
        group.append(step.head)
    assert peak > 20 * ANGLE_TOL  # the angles are not all ~0
    print(f"{name}: Sahara angle deviation {worst:.1e} deg, largest angle {peak:.3f} deg")
    assert record(name, "safety Sahara angle (deg)", worst, tolerance=ANGLE_TOL) <= ANGLE_TOL


def test_first_order_change_of_z_equals_the_hooks(family):
    """ablated_z_delta (UA: mean of the KV head's values over the visible keys, the sliding window on Gemma's
    window layers; SC: (eps - 1) z) == z under the real UA / SC hooks, every layer and query head."""
    name, model = family
    ids = model.encode(PROMPTS[0] + " " + PROMPTS[1])
    assert ids.shape[-1] > 8  # longer than the Gemma windows
    names = lambda n: n.endswith("attn.hook_z") or n.endswith("attn.hook_v")  # noqa: E731
    _, clean = model.run_with_cache(ids, names_filter=names)
    worst = 0.0
    for ablation, epsilon in (("query", 0.0), ("output", 1e-3)):
        with intervene(model, ablate(model.all_heads(), ablation, epsilon)):
            _, ablated = model.run_with_cache(ids, names_filter=names)
        for layer in range(model.n_layers):
            z, v = clean[f"blocks.{layer}.attn.hook_z"], clean[f"blocks.{layer}.attn.hook_v"]
            # all heads of every layer ablated: layer > 0 sees ablated inputs, so compare within the ablated run
            z_abl, v_abl = ablated[f"blocks.{layer}.attn.hook_z"], ablated[f"blocks.{layer}.attn.hook_v"]
            window = architecture(model).attention(layer).window
            if layer == 0:
                delta = ablated_z_delta(z, v, ablation, epsilon, model, window)
                worst = max(worst, float((z + delta - z_abl).abs().max()))
            if ablation == "query":  # the uniform pattern reads v of the same (ablated) run
                expected = ablated_z_delta(torch.zeros_like(z_abl), v_abl, ablation, epsilon, model, window)
                worst = max(worst, float((expected - z_abl).abs().max()))
    assert record(name, "safety first-order dz", worst) <= ATOL
