"""NeMo's search over neurons: the initial selection that widens until δ no longer looks memorized, then the
refinement that unblocks what is not needed (docs/methods.md §4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from analysis.progress import Callback, report

Blocked = dict[str, list[int]]  # layer -> blocked neurons, in the order refinement visits them
BlockedSimilarity = Callable[[Blocked], float]  # the criterion with these neurons blocked


@dataclass
class SelectionRound:
    """One round of NeMo's initial selection."""

    theta: float
    k: int
    similarity: float  # max over memorized seeds of MS-SSIM(δ unblocked, δ blocked)
    neurons: dict[str, int]  # blocked neurons per layer


def neuron_masks(blocked: Blocked, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Blocked neuron lists -> bool `[out]` per layer, True where blocked."""
    masks = {}
    for name, layer in layers.items():
        masks[name] = torch.zeros(layer.out_features, dtype=torch.bool)
        masks[name][blocked[name]] = True
    return masks


def selection_rounds(theta_start: float = 5.0, theta_step: float = 0.25, theta_min: float = 1.0) -> list[float]:
    """θ of each round of the initial selection: θ_start, θ_start − step, … while above θ_min (at least one).

    The authors' loop lowers θ after a round that misses τ and stops once θ
    reaches θ_min, before evaluating it: from 5 by 0.25 that is 16 rounds, the
    last at θ = 1.25.
    """
    if theta_step <= 0:
        raise ValueError(f"theta_step must be positive, got {theta_step}")
    rounds = [theta_start]
    # A small tolerance so that 5 − 16·0.25 counts as reaching 1 despite rounding.
    while theta_start - len(rounds) * theta_step > theta_min + 1e-9:
        rounds.append(theta_start - len(rounds) * theta_step)
    return rounds


def selected_neurons(activations: torch.Tensor, z_scores: torch.Tensor, theta: float, k: int,
                     duplicates: bool = False) -> list[int]:
    """One layer's neurons blocked in a round, in the order of the authors' list: the outliers (z > θ) by index,
    then the k most active from the most active down.

    A neuron that is both is listed twice with `duplicates`, as in the
    authors' list, else once, at its top-k place (`refine` says what the
    second copy changes).
    """
    top = activations.topk(min(k, len(activations))).indices.tolist()
    outliers = [i for i in (z_scores > theta).nonzero().flatten().tolist() if duplicates or i not in top]
    return outliers + top


def initial_selection(activations: dict[str, torch.Tensor], z_scores: dict[str, torch.Tensor],
                      similarity_when_blocked: BlockedSimilarity, threshold: float, theta_start: float = 5.0,
                      theta_step: float = 0.25, theta_min: float = 1.0, duplicates: bool = False,
                      callback: Callback | None = None) -> tuple[Blocked, float, list[SelectionRound]]:
    """NeMo's initial selection: block outliers (z > θ) and the k most active neurons per layer, widening each round.

    Round r (from 0) uses θ = `selection_rounds(...)`[r] and k = r; the
    selection ends at the first round whose similarity (`similarity_when_blocked(blocked)`)
    is ≤ `threshold`, or after the last round. Returns the last round's
    blocked neurons per layer (in refinement's order, listed twice where `selected_neurons` lists them so), its
    similarity and every round.
    """
    thetas = selection_rounds(theta_start, theta_step, theta_min)
    trace = []
    for k, theta in enumerate(thetas):
        blocked = {name: selected_neurons(activations[name], z_scores[name], theta, k, duplicates)
                   for name in activations}
        similarity = similarity_when_blocked(blocked)
        trace.append(SelectionRound(theta, k, similarity, {name: len(set(found)) for name, found in blocked.items()}))
        report(callback, "NeMo initial selection", k + 1, len(thetas),
               f"θ={theta:.2f} k={k}: {sum(trace[-1].neurons.values())} neurons, MS-SSIM {similarity:.3f} "
               f"(τ {threshold:.3f})")
        if similarity <= threshold:
            break
    return blocked, similarity, trace


def refine(blocked: Blocked, similarity: float, similarity_when_blocked: BlockedSimilarity, criterion: float,
           callback: Callback | None = None) -> tuple[Blocked, float]:
    """NeMo's refinement: unblock whole layers (last first), then single neurons (last layer first, each layer's in
    its list order). A change is kept when the similarity is strictly below `criterion`.

    A neuron listed twice is visited twice, as in the authors' loop: each
    visit removes one copy. While the other copy remains, the trial blocks
    the same neurons as the current mask and so scores the current
    similarity, which is used without a UNet call: the copy goes only when
    the current similarity is already below `criterion`. When the first
    visit is refused (the selection ran out of rounds and nothing has been
    unblocked yet), the second removes the other copy only in the same way,
    and the neuron is never tested.
    """
    trials = 0

    def keep_if_below(trial: Blocked, stage: str, unchanged: bool = False) -> None:
        nonlocal blocked, similarity, trials
        trial_similarity = similarity if unchanged else similarity_when_blocked(trial)
        if trial_similarity < criterion:
            blocked, similarity = trial, trial_similarity
        trials += 1
        report(callback, "NeMo refinement", trials, None,
               f"{stage}: {sum(len(set(found)) for found in blocked.values())} neurons, MS-SSIM {similarity:.3f}")

    for name in reversed(blocked):
        if blocked[name]:
            keep_if_below({**blocked, name: []}, "layers")
    for name in reversed(blocked):
        for neuron in list(blocked[name]):
            remaining = list(blocked[name])
            remaining.remove(neuron)  # the first copy, as list.remove does in the authors' loop
            keep_if_below({**blocked, name: remaining}, "neurons", unchanged=neuron in remaining)
    return blocked, similarity
