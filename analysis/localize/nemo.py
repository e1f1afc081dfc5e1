"""NeMo: localize a memorized prompt in output neurons of cross-attention value layers (Hintersdorf et al., NeurIPS 2024).

docs/methods.md §3, following the authors' code (github.com/ml-research/localizing_memorization_in_diffusion_models):

1. Activation of neuron i of a value layer for a prompt: a_i = mean over tokens
   |(W_v y)_i|. Its mean μ_i and std σ_i over non-memorized reference prompts
   are cached; the outlier score is z_i = |a_i − μ_i| / σ_i.
2. Memorization signal: δ = ε(x_t, t, y) − x_t at an early denoising step,
   text branch only ("guidance 0"), min–max normalised per image and channel.
   A seed counts as memorized when its δ has MS-SSIM > τ with at least one
   other seed; only those seeds are used from then on. τ = mean + 1 std of
   that pairwise MS-SSIM on non-memorized prompts.
3. Initial selection: θ = 5, k = 0; each round blocks every neuron with z > θ
   plus the k neurons of largest a per layer, then θ −= 0.25 (floor 1), k += 1,
   until the max over seeds of MS-SSIM(δ unblocked, δ blocked) is ≤ τ.
4. Refinement: unblock whole layers (last first), then single neurons, keeping
   each change that keeps the criterion.

Choices where this differs from the authors' code, each for a stated reason:

* MS-SSIM with 3 scales of a 7x7 window (`analysis.metrics.ms_ssim`) where the
  authors use 3 scales of an 11x11 window (torchmetrics, betas 0.33 each): an
  11x11 window does not fit the coarsest scale of a 32x32 image.
* δ is read at step `step_index=2` of the model's DDIM schedule by default
  (t = 701 of the demo model's 10 steps), blocking active on every step up to
  it; the authors read step 1 of 50 (t = 961). Measured on the demo model
  (docs/results/mitigation.md): there δ separates memorized from held-out
  captions better than at the first step (between-seed MS-SSIM 0.53–0.75 vs
  0.01–0.13, τ 0.20), and the MS-SSIM between δ of two unrelated captions with
  the same seed, a floor for the same-seed criterion, falls from 0.64 to
  0.40, still above τ: in pixel space a seed's noise shapes its δ at every
  early step, so on this model the criterion is not reached.
* τ is calibrated with the same δ (text branch only) as the criterion; the
  authors calibrated with guidance 7 but tested with guidance 0.
* As in the authors' code, the selection loop also ends after the round at
  the θ floor (17 rounds from θ = 5), and if τ was not reached by then,
  refinement keeps the similarity reached instead of τ.
* Activations are read by a hook on a UNet forward pass, so anything the UNet
  does to the text states before the value projection is included.

On the bundled demo model the memorized captions are strong outliers (max z
7.9–17.4, held-out captions 3.2–4.7), yet NeMo's largest mask (184–238 of 320
neurons) leaves them replicating on 0–8 of 10 seeds (mean 0.43) while changing
held-out generations (pixel correlation 0.51–0.64); replication stops only
with 256 of the 320 neurons or the whole `down.2` value layer blocked (held-out
correlation 0.41 / 0.54). Memorization there is not local
(docs/results/mitigation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from analysis.hooks import MeanAbsOutput, hooked, nemo_layers, resolve_layers, zero_outputs
from analysis.localize import DEFAULT_CACHE_DIR, cache_key, cached, localizer_target, weights_checksum
from analysis.masks import Mask, removed_counts
from analysis.metrics import ms_ssim
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, SamplingCancelled, as_embeddings, encode_prompts, sample

DEFAULT_SEEDS = tuple(range(10))
SCALES = 3  # MS-SSIM scales, as in the authors' code


def noise_differences(handle: ModelHandle, text: torch.Tensor, seeds: Sequence[int], steps: int, step_index: int = 0,
                      batch_size: int | None = None) -> torch.Tensor:
    """NeMo's δ = ε(x_t, t, y) − x_t at denoising step `step_index` for every (prompt, seed), item-major.

    Read off `sample`'s own loop: a `steps`-step DDIM run, text branch only
    (guidance 1), stopped after step `step_index` (0: at x_T itself). Forward
    hooks active around the call act on every step. `text`: embeddings
    `[n, 77, d]`. Returns `[n * len(seeds), C, h, w]` float32, min–max
    normalised to [-1, 1] per image and channel.
    """
    if not 0 <= step_index < steps:
        raise ValueError(f"step_index must be in [0, {steps}), got {step_index}")
    captured = []

    def capture(step: DenoisingStep) -> None:
        if step.index == step_index:
            captured.append(step.noise_text - step.latents)
            raise SamplingCancelled

    try:
        sample(handle, text, seeds, steps=steps, guidance=1.0, callback=capture, batch_size=batch_size)
    except SamplingCancelled:
        pass  # the planned stop at step_index
    delta = captured[0].float()
    low, high = delta.amin(dim=(2, 3), keepdim=True), delta.amax(dim=(2, 3), keepdim=True)
    return 2 * (delta - low) / (high - low).clamp_min(1e-12) - 1


def max_ssim_with_other_seeds(deltas: torch.Tensor, scales: int = SCALES) -> torch.Tensor:
    """For each δ of `[n, C, h, w]` (one prompt, n seeds), its highest MS-SSIM with any other: `[n]`."""
    pairs = torch.combinations(torch.arange(len(deltas)), r=2)
    similarities = ms_ssim(deltas[pairs[:, 0]], deltas[pairs[:, 1]], scales)
    best = torch.full((len(deltas),), -1.0)
    for column in (0, 1):
        best = best.scatter_reduce(0, pairs[:, column], similarities, reduce="amax")
    return best


def calibrate_threshold(handle: ModelHandle, prompts: Sequence[str], seeds: Sequence[int] = DEFAULT_SEEDS,
                        steps: int | None = None, step_index: int = 0, scales: int = SCALES,
                        cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int | None = None) -> float:
    """τ = mean + 1 std of the pairwise MS-SSIM between the δ of different seeds of each non-memorized prompt.

    δ as `noise_differences` reads it. Cached per model weights, prompts,
    seeds, steps and step. SD v1.4 gives 0.428.
    """
    steps = steps or handle.default_steps
    seeds = [int(seed) for seed in seeds]

    def compute() -> dict[str, torch.Tensor]:
        deltas = noise_differences(handle, encode_prompts(handle, list(prompts)), seeds, steps, step_index, batch_size)
        pairs = torch.combinations(torch.arange(len(seeds)), r=2)
        similarities = torch.cat([ms_ssim(per_prompt[pairs[:, 0]], per_prompt[pairs[:, 1]], scales)
                                  for per_prompt in deltas.split(len(seeds))])
        return {"threshold": similarities.mean() + similarities.std()}

    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), list(prompts), seeds, steps, step_index,
                    f"ms_ssim-{scales}")
    return cached(cache_dir, "nemo-threshold", key, compute)["threshold"].item()


def reference_statistics(handle: ModelHandle, layers: dict[str, nn.Linear], prompts: Sequence[str],
                         cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                         batch_size: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean μ and std σ `[out]` of each neuron's activation a_i over `prompts`. Cached."""
    def compute() -> dict[str, torch.Tensor]:
        activations = record_activations(handle, layers, encode_prompts(handle, list(prompts)), batch_size)
        stats = {}
        for name, per_prompt in activations.items():
            stats[f"mean:{name}"], stats[f"std:{name}"] = per_prompt.mean(dim=0), per_prompt.std(dim=0)
        return stats

    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), list(layers), list(prompts))
    stats = cached(cache_dir, "nemo-stats", key, compute)
    return {name: (stats[f"mean:{name}"], stats[f"std:{name}"]) for name in layers}


def record_activations(handle: ModelHandle, layers: dict[str, nn.Linear], text: torch.Tensor,
                       batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """a_i of every neuron for each embedding of `text` `[n, 77, d]`: name -> `[n, out]`.

    One UNet forward per embedding (seed 0, first timestep); a_i depends on the text only.
    """
    recorders = {name: MeanAbsOutput() for name in layers}
    with hooked(handle.unet, forward_hooks=recorders):
        noise_differences(handle, text, [0], handle.default_steps, batch_size=batch_size)
    return {name: recorder.rows() for name, recorder in recorders.items()}


@dataclass
class SelectionRound:
    """One round of NeMo's initial selection."""

    theta: float
    k: int
    similarity: float  # max over memorized seeds of SSIM(δ unblocked, δ blocked)
    neurons: dict[str, int]  # blocked neurons per layer


class NeMo:
    """Find the value-layer neurons whose blocking stops a prompt's memorization.

    `mask = NeMo().fit(handle, prompt)`; `with mask.applied(handle): sample(...)`.

    Parameters: `reference_prompts`, non-memorized prompts for μ, σ and τ
    (None: the handle's held-out prompts); `layers`, hook point names (None:
    value projections of the down and mid blocks); `threshold`, τ (None:
    `calibrate_threshold` on the reference prompts with `calibration_seeds`);
    `steps` of the DDIM schedule (None: the model's default) and `step_index`,
    the step δ is read at (0: x_T; the authors read step 1 of 50); θ
    schedule; `scales` of MS-SSIM (3 need images of at least 28 pixels);
    `refine=False` returns the initial selection, the largest mask NeMo
    considers (refinement only unblocks neurons from it, at one criterion
    evaluation per blocked neuron);
    `cache_dir` (None: no cache); `batch_size` caps UNet rows per call;
    `progress(message)` is called after every criterion evaluation.

    After `fit`: `threshold_` (τ used), `memorized_seeds_`, `trace_` (one
    `SelectionRound` per initial-selection round), `similarity_` (criterion
    value of the final mask), `unet_evaluations_` (UNet rows spent on the
    prompt; the cached reference statistics and τ not counted).
    """

    def __init__(self, reference_prompts: Sequence[str] | None = None, layers: Sequence[str] | None = None,
                 threshold: float | None = None, calibration_seeds: Sequence[int] = DEFAULT_SEEDS,
                 steps: int | None = None, step_index: int = 2, theta_start: float = 5.0, theta_step: float = 0.25,
                 theta_min: float = 1.0, scales: int = SCALES, refine: bool = True,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                 batch_size: int | None = None, progress: Callable[[str], None] | None = None):
        self.reference_prompts = reference_prompts
        self.layers = layers
        self.threshold = threshold
        self.calibration_seeds = calibration_seeds
        self.steps = steps
        self.step_index = step_index
        self.theta_start = theta_start
        self.theta_step = theta_step
        self.theta_min = theta_min
        self.scales = scales
        self.refine = refine
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, handle: ModelHandle, prompt: str | torch.Tensor, seeds: Sequence[int] = DEFAULT_SEEDS) -> Mask:
        """`prompt`: a prompt or an embedding `[77, d]` (e.g. a Dori trigger)."""
        conditioning, prompt = localizer_target(prompt)
        seeds = [int(seed) for seed in seeds]
        if len(seeds) < 2:
            raise ValueError("NeMo compares seeds with each other: give at least 2")
        steps = self.steps or handle.default_steps
        reference_prompts = list(self.reference_prompts or handle.held_out_prompts)
        if not reference_prompts:
            raise ValueError("NeMo needs non-memorized reference prompts: pass reference_prompts")
        layers = nemo_layers(handle.unet) if self.layers is None else resolve_layers(handle.unet, self.layers)
        statistics = reference_statistics(handle, layers, reference_prompts, self.cache_dir, self.batch_size)
        self.threshold_ = self.threshold
        if self.threshold_ is None:
            self.threshold_ = calibrate_threshold(handle, reference_prompts, self.calibration_seeds, steps,
                                                  self.step_index, self.scales, self.cache_dir, self.batch_size)
        self.trace_: list[SelectionRound] = []
        text = as_embeddings(handle, conditioning)
        activations = record_activations(handle, layers, text, self.batch_size)
        activations = {name: per_prompt[0] for name, per_prompt in activations.items()}
        self.unet_evaluations_ = 1

        def deltas_of(chosen_seeds: list[int]) -> torch.Tensor:
            self.unet_evaluations_ += (self.step_index + 1) * len(chosen_seeds)
            return noise_differences(handle, text, chosen_seeds, steps, self.step_index, self.batch_size)

        unblocked = deltas_of(seeds)
        z_scores = {name: (activations[name] - mean).abs() / std.clamp_min(1e-12)
                    for name, (mean, std) in statistics.items()}

        memorized = max_ssim_with_other_seeds(unblocked, self.scales) > self.threshold_
        self.memorized_seeds_ = [seed for seed, flag in zip(seeds, memorized.tolist()) if flag]
        if not self.memorized_seeds_:
            self.similarity_ = None
            self._report("no seed's δ resembles another's: the prompt does not look memorized, nothing blocked")
            nothing = {name: torch.zeros(layer.out_features, dtype=torch.bool) for name, layer in layers.items()}
            return self._mask(handle, prompt, seeds, steps, nothing)
        unblocked = unblocked[memorized]

        def similarity_when_blocked(blocked: dict[str, torch.Tensor]) -> float:
            hooks = {name: zero_outputs(removed) for name, removed in blocked.items() if removed.any()}
            with hooked(handle.unet, forward_hooks=hooks):
                return ms_ssim(unblocked, deltas_of(self.memorized_seeds_), self.scales).max().item()

        blocked, similarity, self.trace_ = initial_selection(
            activations, z_scores, similarity_when_blocked, self.threshold_, self.theta_start, self.theta_step,
            self.theta_min, self._report)
        if self.refine:
            # If the loop ended without reaching τ, refine against the similarity reached (as the authors do).
            blocked, similarity = refine(blocked, similarity, similarity_when_blocked,
                                         max(self.threshold_, similarity), self._report)
        self.similarity_ = similarity
        return self._mask(handle, prompt, seeds, steps, blocked)

    def _mask(self, handle: ModelHandle, prompt: str, seeds: list[int], steps: int,
              blocked: dict[str, torch.Tensor]) -> Mask:
        parameters = dict(seeds=seeds, memorized_seeds=self.memorized_seeds_, steps=steps, step_index=self.step_index,
                          threshold=self.threshold_, theta_start=self.theta_start, theta_step=self.theta_step,
                          theta_min=self.theta_min, scales=self.scales, refine=self.refine, similarity=self.similarity_,
                          unet_evaluations=self.unet_evaluations_)
        return Mask(blocked, method="nemo", prompt=prompt, model=handle.name, parameters=parameters)

    def _report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


BlockedSimilarity = Callable[[dict[str, torch.Tensor]], float]
Report = Callable[[str], None]


def initial_selection(activations: dict[str, torch.Tensor], z_scores: dict[str, torch.Tensor],
                      similarity_when_blocked: BlockedSimilarity, threshold: float, theta_start: float = 5.0,
                      theta_step: float = 0.25, theta_min: float = 1.0, report: Report | None = None,
                      ) -> tuple[dict[str, torch.Tensor], float, list[SelectionRound]]:
    """NeMo's initial selection: block outliers (z > θ) and the k most active neurons per layer, widening each round.

    Starts at θ = `theta_start`, k = 0; after each round whose similarity is
    above `threshold`, θ −= `theta_step` and k += 1. Ends when the similarity
    is ≤ `threshold` or after the round at θ = `theta_min` (the authors' code
    stops there too). Returns the last round's blocked neurons (bool `[out]`
    per layer), its similarity and every round.
    """
    theta, k = theta_start, 0
    trace = []
    while True:
        blocked = {name: (z_scores[name] > theta) | top_k(activations[name], k) for name in activations}
        similarity = similarity_when_blocked(blocked)
        trace.append(SelectionRound(theta, k, similarity, removed_counts(blocked)))
        if report is not None:
            report(f"initial selection θ={theta:.2f} k={k}: {sum(trace[-1].neurons.values())} neurons, "
                   f"SSIM {similarity:.3f} (τ {threshold:.3f})")
        if similarity <= threshold or theta <= theta_min:
            return blocked, similarity, trace
        theta, k = max(theta - theta_step, theta_min), k + 1


def refine(blocked: dict[str, torch.Tensor], similarity: float, similarity_when_blocked: BlockedSimilarity,
           criterion: float, report: Report | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """NeMo's refinement: unblock whole layers (last first), then single neurons.

    Each change is kept when the similarity stays ≤ `criterion`.
    """
    def keep_if_criterion_holds(trial: dict[str, torch.Tensor], stage: str) -> None:
        nonlocal blocked, similarity
        trial_similarity = similarity_when_blocked(trial)
        if trial_similarity <= criterion:
            blocked, similarity = trial, trial_similarity
        if report is not None:
            report(f"refining {stage}: {sum(removed_counts(blocked).values())} neurons, SSIM {similarity:.3f}")

    for name in reversed(blocked):
        if blocked[name].any():
            keep_if_criterion_holds({**blocked, name: torch.zeros_like(blocked[name])}, "layers")
    for name in reversed(blocked):
        for neuron in blocked[name].nonzero().flatten().tolist():
            without_neuron = blocked[name].clone()
            without_neuron[neuron] = False
            keep_if_criterion_holds({**blocked, name: without_neuron}, "neurons")
    return blocked, similarity


def top_k(activations: torch.Tensor, k: int) -> torch.Tensor:
    """Bool `[n]`, True at the k largest activations."""
    chosen = torch.zeros_like(activations, dtype=torch.bool)
    chosen[activations.topk(min(k, len(activations))).indices] = True
    return chosen

