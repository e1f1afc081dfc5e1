"""NeMo: a memorized prompt's output neurons in cross-attention value layers (Hintersdorf et al., NeurIPS 2024).

docs/methods.md §4 gives the method, its formulas and each place where this
implementation departs from the authors' code
(github.com/ml-research/localizing_memorization_in_diffusion_models). In short:

1. Activation a_i of neuron i of a value layer: the mean over tokens of
   |(W_v y)_i|; its outlier score z_i = |a_i − μ_i| / σ_i against
   non-memorized reference prompts.
2. Noise difference δ = ε(x, t, y) − x (text branch only), min–max normalised
   to [0, 1] per image and channel; a seed counts as memorized when its δ has
   MS-SSIM (data range 1) > τ with another seed's.
3. Initial selection: θ = 5, k = 0, then θ −= 0.25, k += 1 per round, blocking
   every neuron with z > θ plus the k most active per layer, until the largest
   MS-SSIM between a seed's δ unblocked and blocked is ≤ τ; at most 16 rounds
   (the last at θ = 1.25, k = 15), as the authors' loop stops before θ = 1.
4. Refinement: unblock whole layers (last first), then single neurons in the
   order of the authors' list; a change is kept when the criterion is strictly
   below τ (below the similarity reached, when the selection ran out of rounds).

Two groups of settings (`SETTINGS`), chosen per model by `settings="auto"`:
"authors" (the authors' code; the default for latent Stable Diffusion models)
and "pixel" (the bundled pixel-space demo model, where the authors' δ does not
separate memorized from other captions). Any setting given explicitly wins.

Here: the settings, the reference statistics and the estimator `NeMo`; δ and
τ (step 2) are in `nemo_delta`, the selection and refinement (steps 3–4) in
`nemo_selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from analysis.hooks import MeanAbsOutput, hooked, nemo_layers, resolve_layers, zero_outputs
from analysis.localize import DEFAULT_CACHE_DIR, cache_key, cached, localizer_target, weights_checksum
from analysis.localize.nemo_delta import (SCALES, DeltaReading, calibrate_threshold, delta_similarity,
                                          max_ssim_with_other_seeds, noise_differences)
from analysis.localize.nemo_selection import Blocked, SelectionRound, initial_selection, neuron_masks, refine
from analysis.masks import Mask
from analysis.model import REPO_ROOT, ModelHandle
from analysis.progress import Callback, report
from analysis.sampling import as_embeddings, denoising_steps

DEFAULT_SEEDS = tuple(range(10))
SETTINGS = {
    # The authors' code: x_T fed at the schedule's second timestep (t = 961 of SD's 50 DDIM steps), torchmetrics'
    # 11x11 Gaussian window, τ calibrated with guidance 7.
    "authors": dict(step_index=1, advance_latents=False, window=11, threshold_guidance=7.0),
    # The bundled 32x32 pixel-space model: δ read after two DDIM steps, a 7x7 window, τ from the same δ as the
    # criterion (docs/methods.md §4.3 says why).
    "pixel": dict(step_index=2, advance_latents=True, window=7, threshold_guidance=1.0),
}
SETTING_NAMES = ("auto", *SETTINGS)
# The authors' τ and reference statistics for SD v1.4, both from their additional LAION prompts.
SD14_NAMES = ("CompVis/stable-diffusion-v1-4",)
SD14_THRESHOLD = 0.428
SD14_STATISTICS = REPO_ROOT / "assets" / "sd14_memorization" / "nemo_statistics_v1_4.safetensors"

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (μ, σ), each [out]


def reference_statistics(handle: ModelHandle, layers: dict[str, nn.Linear], prompts: Sequence[str],
                         cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int | None = None) -> Statistics:
    """Per layer, the mean μ and std σ `[out]` of each neuron's activation a_i over `prompts`. Cached."""
    def compute() -> dict[str, torch.Tensor]:
        activations = record_activations(handle, layers, list(prompts), batch_size)
        stats = {}
        for name, per_prompt in activations.items():
            stats[f"mean:{name}"], stats[f"std:{name}"] = per_prompt.mean(dim=0), per_prompt.std(dim=0)
        return stats

    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), list(layers), list(prompts))
    stats = cached(cache_dir, "nemo-stats", key, compute)
    return {name: (stats[f"mean:{name}"], stats[f"std:{name}"]) for name in layers}


def sd14_statistics(layers: dict[str, nn.Linear]) -> Statistics:
    """The authors' μ and σ for SD v1.4's value layers (assets/sd14_memorization); the layers must be those seven."""
    stats = load_file(str(SD14_STATISTICS))
    expected = {name.removeprefix("mean:"): len(mean) for name, mean in stats.items() if name.startswith("mean:")}
    found = {name: layer.out_features for name, layer in layers.items()}
    if found != expected:
        raise ValueError(f"NeMo's SD v1.4 statistics cover the layers {expected}, this model's are {found}: "
                         "pass reference_prompts to compute statistics for it")
    return {name: (stats[f"mean:{name}"], stats[f"std:{name}"]) for name in layers}


def record_activations(handle: ModelHandle, layers: dict[str, nn.Linear], conditioning: list[str] | torch.Tensor,
                       batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """a_i of every neuron for each prompt or embedding `[n, 77, d]`: name -> `[n, out]`.

    One UNet forward per prompt (seed 0, first timestep); a_i depends on the text only.
    """
    recorders = {name: MeanAbsOutput() for name in layers}
    with hooked(handle.unet, forward_hooks=recorders):
        next(denoising_steps(handle, conditioning, [0], handle.default_steps, guidance=1.0, batch_size=batch_size))
    return {name: recorder.rows() for name, recorder in recorders.items()}


def resolve_settings(handle: ModelHandle, settings: str, **given) -> dict:
    """The named settings (`"auto"`: "pixel" for a pixel-space model, else "authors") with the `given` non-None
    values in their place; `name` says which group they started from."""
    if settings not in SETTING_NAMES:
        raise ValueError(f"unknown NeMo settings {settings!r}; choose one of {SETTING_NAMES}")
    if settings == "auto":
        settings = "pixel" if handle.pixel_space else "authors"
    return dict(SETTINGS[settings], **{key: value for key, value in given.items() if value is not None},
                name=settings)

class NeMo:
    """Find the value-layer neurons whose blocking stops a prompt's memorization.

    `nemo = NeMo(reference_prompts=[...]).fit(handle, prompt)`; then
    `with nemo.mask_.applied(handle): sample(...)`.

    Parameters: `reference_prompts`, non-memorized prompts for μ, σ and τ
    (None: the handle's held-out prompts; on SD v1.4 with the authors'
    settings, the authors' statistics and τ = 0.428); `settings`, "auto",
    "authors" or "pixel" (`SETTINGS`), which fills in `step_index` (the step
    δ is read at), `advance_latents` (whether the latents are stepped there),
    `window` (of MS-SSIM) and `threshold_guidance` (of τ's δ) where they are
    None; `layers`, hook point names (None: value projections of the down and
    mid blocks); `threshold`, τ (None: calibrated on the reference prompts
    with `calibration_seeds`); `steps` of the DDIM schedule (None: the
    model's default); `scales` of MS-SSIM; the θ schedule; `refine=False`
    keeps the initial selection, the largest mask NeMo considers (refinement
    costs one criterion evaluation per blocked neuron); `cache_dir` (None: no
    cache); `batch_size` caps UNet rows per call.

    After `fit`: `mask_` (the blocked neurons), `threshold_` (τ used),
    `settings_` (the settings used), `memorized_seeds_`, `trace_` (one
    `SelectionRound` per initial-selection round), `similarity_` (criterion
    value of the final mask), `unet_evaluations_` (UNet rows spent on the
    prompt; the cached reference statistics and τ not counted).
    """

    def __init__(self, reference_prompts: Sequence[str] | None = None, settings: str = "auto",
                 layers: Sequence[str] | None = None, threshold: float | None = None,
                 calibration_seeds: Sequence[int] = DEFAULT_SEEDS, steps: int | None = None,
                 step_index: int | None = None, advance_latents: bool | None = None, window: int | None = None,
                 threshold_guidance: float | None = None, scales: int = SCALES, theta_start: float = 5.0,
                 theta_step: float = 0.25, theta_min: float = 1.0, refine: bool = True,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int | None = None):
        self.reference_prompts = reference_prompts
        self.settings = settings
        self.layers = layers
        self.threshold = threshold
        self.calibration_seeds = calibration_seeds
        self.steps = steps
        self.step_index = step_index
        self.advance_latents = advance_latents
        self.window = window
        self.threshold_guidance = threshold_guidance
        self.scales = scales
        self.theta_start = theta_start
        self.theta_step = theta_step
        self.theta_min = theta_min
        self.refine = refine
        self.cache_dir = cache_dir
        self.batch_size = batch_size

    def fit(self, handle: ModelHandle, prompt: str | torch.Tensor, seeds: Sequence[int] = DEFAULT_SEEDS,
            callback: Callback | None = None) -> NeMo:
        """Localize `prompt` (a prompt or an embedding `[77, d]`, e.g. a Dori trigger); returns this estimator.

        `callback` receives a `TaskProgress` after every criterion evaluation
        and may raise `SamplingCancelled` to stop.
        """
        conditioning, label = localizer_target(prompt)
        seeds = [int(seed) for seed in seeds]
        if len(seeds) < 2:
            raise ValueError("NeMo compares seeds with each other: give at least 2")
        self.settings_ = resolve_settings(handle, self.settings, step_index=self.step_index,
                                          advance_latents=self.advance_latents, window=self.window,
                                          threshold_guidance=self.threshold_guidance)
        self.settings_["steps"] = self.steps or handle.default_steps
        reading = DeltaReading(self.settings_["steps"], self.settings_["step_index"],
                               self.settings_["advance_latents"])
        window = self.settings_["window"]
        coarsest = min(handle.latent_shape[1:]) // 2 ** (self.scales - 1)
        if coarsest < window:
            raise ValueError(f"{self.scales} MS-SSIM scales of this model's {handle.latent_shape[1]}-pixel latents "
                             f"end at {coarsest}x{coarsest}, smaller than the {window}x{window} SSIM window: pass a "
                             "smaller window or fewer scales")
        layers = nemo_layers(handle.unet) if self.layers is None else resolve_layers(handle.unet, self.layers)
        statistics, self.threshold_ = self._reference(handle, layers, reading)

        text = as_embeddings(handle, conditioning)
        activations = {name: rows[0] for name, rows in record_activations(handle, layers, text,
                                                                          self.batch_size).items()}
        self.unet_evaluations_ = 1
        z_scores = {name: (activations[name] - mean).abs() / std.clamp_min(1e-12)
                    for name, (mean, std) in statistics.items()}

        def deltas_of(chosen_seeds: list[int]) -> torch.Tensor:
            self.unet_evaluations_ += reading.unet_rows(len(chosen_seeds))
            return noise_differences(handle, text, chosen_seeds, reading, self.batch_size)

        unblocked = deltas_of(seeds)
        memorized = max_ssim_with_other_seeds(unblocked, window, self.scales) > self.threshold_
        self.memorized_seeds_ = [seed for seed, flag in zip(seeds, memorized.tolist()) if flag]
        self.trace_: list[SelectionRound] = []
        if not self.memorized_seeds_:
            self.similarity_ = None
            report(callback, "NeMo", 1, 1, "no seed's δ resembles another's: the prompt does not look memorized, "
                                           "nothing blocked")
            self.mask_ = self._mask(handle, label, seeds, {name: [] for name in layers}, layers)
            return self
        unblocked = unblocked[memorized]

        def similarity_when_blocked(blocked: Blocked) -> float:
            masks = neuron_masks(blocked, layers)
            hooks = {name: zero_outputs(removed) for name, removed in masks.items() if removed.any()}
            with hooked(handle.unet, forward_hooks=hooks):
                return delta_similarity(unblocked, deltas_of(self.memorized_seeds_), window, self.scales).max().item()

        blocked, similarity, self.trace_ = initial_selection(
            activations, z_scores, similarity_when_blocked, self.threshold_, self.theta_start, self.theta_step,
            self.theta_min, callback)
        if self.refine:
            # When the rounds ran out above τ, refinement keeps the similarity reached instead (as the authors do).
            blocked, similarity = refine(blocked, similarity, similarity_when_blocked,
                                         max(self.threshold_, similarity), callback)
        self.similarity_ = similarity
        self.mask_ = self._mask(handle, label, seeds, blocked, layers)
        return self

    def _reference(self, handle: ModelHandle, layers: dict[str, nn.Linear],
                   reading: DeltaReading) -> tuple[Statistics, float]:
        """μ, σ and τ: from the reference prompts, or the authors' for SD v1.4 when none are given."""
        if (self.reference_prompts is None and self.settings_["name"] == "authors" and handle.name in SD14_NAMES):
            self.settings_["reference"] = "the authors' SD v1.4 statistics"
            return sd14_statistics(layers), SD14_THRESHOLD if self.threshold is None else self.threshold
        prompts = list(self.reference_prompts or handle.held_out_prompts)
        if not prompts:
            raise ValueError("NeMo needs non-memorized reference prompts: pass reference_prompts")
        self.settings_["reference"] = f"{len(prompts)} reference prompts"
        statistics = reference_statistics(handle, layers, prompts, self.cache_dir, self.batch_size)
        if self.threshold is not None:
            return statistics, self.threshold
        calibration = DeltaReading(reading.steps, reading.step_index, reading.advance_latents,
                                   self.settings_["threshold_guidance"])
        return statistics, calibrate_threshold(handle, prompts, self.calibration_seeds, calibration,
                                               self.settings_["window"], self.scales, self.cache_dir, self.batch_size)

    def _mask(self, handle: ModelHandle, label: str, seeds: list[int], blocked: Blocked,
              layers: dict[str, nn.Linear]) -> Mask:
        parameters = dict(seeds=seeds, memorized_seeds=self.memorized_seeds_, settings=self.settings_,
                          threshold=self.threshold_, theta_start=self.theta_start, theta_step=self.theta_step,
                          theta_min=self.theta_min, scales=self.scales, refine=self.refine,
                          similarity=self.similarity_, unet_evaluations=self.unet_evaluations_)
        return Mask(neuron_masks(blocked, layers), method="nemo", prompt=label, model=handle.name,
                    parameters=parameters)

