"""NeMo: a memorized prompt's output neurons in cross-attention value layers (Hintersdorf et al., NeurIPS 2024).

docs/methods.md §4 gives the method, its formulas and each place where this
implementation departs from the authors' code
(github.com/ml-research/localizing_memorization_in_diffusion_models). In short:

1. Activation a_i of neuron i of a value layer: the mean over tokens of
   |(W_v y)_i|; its outlier score z_i = |a_i − μ_i| / σ_i against
   non-memorized reference prompts.
2. Noise difference δ = ε(x, t, y) − x (text branch only), min–max normalised
   to [0, 1] per image and channel; a seed counts as memorized when its δ has
   MS-SSIM > τ with another seed's.
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
"auto" also fits the MS-SSIM window (and scales) to a model whose latents are
too small for the group's; given values or a named group are refused instead.

A prompt's result (mask, τ, trace) is cached by the weights and every setting
(`cached`, name "nemo-mask"); the bundled model's captions at the Mitigate
view's defaults are shipped.

Here: the settings, the reference statistics and the estimator `NeMo`; δ and
τ (step 2) are in `nemo_delta`, the selection and refinement (steps 3–4) in
`nemo_selection`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from analysis.hooks import MeanAbsOutput, hooked, nemo_layers, resolve_layers, zero_outputs
from analysis.localize import DEFAULT_CACHE_DIR, cache_key, cached, localizer_target, weights_checksum
from analysis.localize.nemo_delta import SCALES, DeltaReading, DeltaSimilarity, calibrate_threshold, noise_differences
from analysis.localize.nemo_selection import Blocked, SelectionRound, initial_selection, neuron_masks, refine
from analysis.masks import Mask
from analysis.model import REPO_ROOT, ModelHandle
from analysis.progress import Callback, report
from analysis.sampling import as_embeddings, denoising_steps

DEFAULT_SEEDS = tuple(range(10))
SETTINGS = {
    # The authors' code: x_T fed at the schedule's second timestep (t = 961 of SD's 50 DDIM steps), torchmetrics'
    # MS-SSIM as they call it (11x11 Gaussian window), their list with its duplicates, τ calibrated with guidance 7.
    "authors": dict(step_index=1, advance_latents=False, window=11, scales=SCALES, ms_ssim="torchmetrics",
                    duplicates=True, threshold_guidance=7.0),
    # The bundled 32x32 pixel-space model: δ read after two DDIM steps, a 7x7 window, data range 1, each neuron
    # listed (and tested) once, τ from the same δ as the criterion (docs/methods.md §4.2-4.3 say why).
    "pixel": dict(step_index=2, advance_latents=True, window=7, scales=SCALES, ms_ssim="range1", duplicates=False,
                  threshold_guidance=1.0),
}
SETTING_NAMES = ("auto", *SETTINGS)
MIN_FITTED_WINDOW = 3  # the smallest window "auto" fits to small latents
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
    values in their place; `name` says which group they started from.

    MS-SSIM's `window` must fit the coarsest of its `scales` of the model's
    latents. "auto" with neither given fits them (`fitted` says how), else
    a window that does not fit is refused.
    """
    if settings not in SETTING_NAMES:
        raise ValueError(f"unknown NeMo settings {settings!r}; choose one of {SETTING_NAMES}")
    name = ("pixel" if handle.pixel_space else "authors") if settings == "auto" else settings
    given = {key: value for key, value in given.items() if value is not None}
    resolved = dict(SETTINGS[name], **given, name=name, fitted=None)
    size, window, scales = min(handle.latent_shape[1:]), resolved["window"], resolved["scales"]
    if scales < 1:
        raise ValueError(f"NeMo's MS-SSIM needs at least 1 scale, got {scales}")
    if size // 2 ** (scales - 1) >= window:
        return resolved
    if settings == "auto" and "window" not in given and "scales" not in given:
        for fewer in range(scales, 0, -1):
            coarsest = size // 2 ** (fewer - 1)
            fits = min(window, coarsest if coarsest % 2 else coarsest - 1)  # SSIM windows are odd
            if fits >= MIN_FITTED_WINDOW:
                return dict(resolved, window=fits, scales=fewer,
                            fitted=f"{fits}x{fits} window at {fewer} scales: the {window}x{window} window at "
                                   f"{scales} scales does not fit {size}-pixel latents")
    coarsest = size // 2 ** (scales - 1)
    raise ValueError(f"{scales} MS-SSIM scales of this model's {size}-pixel latents end at {coarsest}x{coarsest}, "
                     f"smaller than the {window}x{window} SSIM window: pass a smaller window or fewer scales")


@dataclass
class Criterion:
    """NeMo's criterion for one prompt (step 7): with neurons blocked, the largest MS-SSIM over its memorized seeds
    between the seed's δ unblocked and blocked. `unet_rows` counts the rows its evaluations spent."""

    handle: ModelHandle
    text: torch.Tensor  # [1, 77, d]
    seeds: list[int]  # the memorized seeds
    unblocked: torch.Tensor  # their δ, unblocked
    reading: DeltaReading
    similarity: DeltaSimilarity
    layers: dict[str, nn.Linear]
    batch_size: int | None = None
    unet_rows: int = 0

    def __call__(self, blocked: Blocked) -> float:
        masks = neuron_masks(blocked, self.layers)
        hooks = {name: zero_outputs(removed) for name, removed in masks.items() if removed.any()}
        self.unet_rows += self.reading.unet_rows(len(self.seeds))
        with hooked(self.handle.unet, forward_hooks=hooks):
            blocked_deltas = noise_differences(self.handle, self.text, self.seeds, self.reading, self.batch_size)
        return self.similarity(self.unblocked, blocked_deltas).max().item()


class NeMo:
    """Find the value-layer neurons whose blocking stops a prompt's memorization.

    `nemo = NeMo(reference_prompts=[...]).fit(handle, prompt)`; then
    `with nemo.mask_.applied(handle): sample(...)`.

    Parameters: `reference_prompts`, non-memorized prompts for μ, σ and τ
    (None: the handle's held-out prompts; on SD v1.4 with the authors'
    settings, the authors' statistics and τ = 0.428); `settings`, "auto",
    "authors" or "pixel" (`SETTINGS`), which fills in `step_index` (the step
    δ is read at), `advance_latents` (whether the latents are stepped there),
    `window` and `scales` (of MS-SSIM), `ms_ssim` ("torchmetrics" or
    "range1", `DeltaSimilarity`), `duplicates` (whether a neuron both outlier
    and top-k is listed twice, as in the authors' list) and
    `threshold_guidance` (of τ's δ) where they are None; `layers`, hook point
    names (None: value projections of the down and mid blocks); `threshold`,
    τ (None: calibrated on the reference prompts with `calibration_seeds`);
    `steps` of the DDIM schedule (None: the model's default); the θ schedule;
    `refine=False` keeps the initial selection, the largest mask NeMo
    considers (refinement costs one criterion evaluation per blocked neuron);
    `cache_dir` (None: no cache); `batch_size` caps UNet rows per call.

    After `fit`: `mask_` (the blocked neurons), `threshold_` (τ used),
    `settings_` (the settings used), `memorized_seeds_`, `trace_` (one
    `SelectionRound` per initial-selection round), `similarity_` (criterion
    value of the final mask), `unet_evaluations_` (UNet rows spent on the
    prompt by the fit that computed the result, which may have been read from
    the cache; the cached reference statistics and τ not counted).
    """

    def __init__(self, reference_prompts: Sequence[str] | None = None, settings: str = "auto",
                 layers: Sequence[str] | None = None, threshold: float | None = None,
                 calibration_seeds: Sequence[int] = DEFAULT_SEEDS, steps: int | None = None,
                 step_index: int | None = None, advance_latents: bool | None = None, window: int | None = None,
                 scales: int | None = None, ms_ssim: str | None = None, duplicates: bool | None = None,
                 threshold_guidance: float | None = None, theta_start: float = 5.0, theta_step: float = 0.25,
                 theta_min: float = 1.0, refine: bool = True, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                 batch_size: int | None = None):
        self.reference_prompts = reference_prompts
        self.settings = settings
        self.layers = layers
        self.threshold = threshold
        self.calibration_seeds = calibration_seeds
        self.steps = steps
        self.step_index = step_index
        self.advance_latents = advance_latents
        self.window = window
        self.scales = scales
        self.ms_ssim = ms_ssim
        self.duplicates = duplicates
        self.threshold_guidance = threshold_guidance
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
                                          scales=self.scales, ms_ssim=self.ms_ssim, duplicates=self.duplicates,
                                          threshold_guidance=self.threshold_guidance)
        self.settings_["steps"] = self.steps or handle.default_steps
        reading = DeltaReading(self.settings_["steps"], self.settings_["step_index"],
                               self.settings_["advance_latents"])
        similarity = DeltaSimilarity(self.settings_["window"], self.settings_["scales"], self.settings_["ms_ssim"])
        layers = nemo_layers(handle.unet) if self.layers is None else resolve_layers(handle.unet, self.layers)
        statistics, self.threshold_ = self._reference(handle, layers, reading, similarity)

        searched = []

        def search() -> dict[str, torch.Tensor]:
            searched.append(True)
            return self._search(handle, conditioning, seeds, layers, statistics, reading, similarity, callback)

        target = conditioning[0] if isinstance(conditioning, list) else hashlib.sha256(
            conditioning.float().contiguous().cpu().numpy().tobytes()).hexdigest()
        key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), target, seeds, self.settings_,
                        list(layers), list(self.reference_prompts or handle.held_out_prompts), self.threshold_,
                        [int(seed) for seed in self.calibration_seeds], self.theta_start, self.theta_step,
                        self.theta_min, self.refine)
        found = cached(self.cache_dir, "nemo-mask", key, search)
        if not searched:
            report(callback, "NeMo", 1, 1, "this prompt's mask with these settings and weights was cached")
        self.memorized_seeds_ = found["memorized_seeds"].tolist()
        self.similarity_ = None if found["similarity"].isnan() else found["similarity"].item()
        self.unet_evaluations_ = int(found["unet_evaluations"])
        self.trace_ = [SelectionRound(theta, int(k), reached, dict(zip(layers, neurons)))
                       for (theta, k, reached), neurons in zip(found["trace"].tolist(),
                                                               found["trace_neurons"].tolist())]
        removed = {name: found[f"mask:{name}"] for name in layers}
        self.mask_ = Mask(removed, method="nemo", prompt=label, model=handle.name, parameters=dict(
            seeds=seeds, memorized_seeds=self.memorized_seeds_, settings=self.settings_, threshold=self.threshold_,
            theta_start=self.theta_start, theta_step=self.theta_step, theta_min=self.theta_min, refine=self.refine,
            similarity=self.similarity_, unet_evaluations=self.unet_evaluations_))
        return self

    def _search(self, handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: list[int],
                layers: dict[str, nn.Linear], statistics: Statistics, reading: DeltaReading,
                similarity: DeltaSimilarity, callback: Callback | None) -> dict[str, torch.Tensor]:
        """Steps 3-4 for one prompt: its result as tensors (what `fit` caches)."""
        text = as_embeddings(handle, conditioning)
        activations = {name: rows[0] for name, rows in record_activations(handle, layers, text,
                                                                          self.batch_size).items()}
        z_scores = {name: (activations[name] - mean).abs() / std.clamp_min(1e-12)
                    for name, (mean, std) in statistics.items()}
        unblocked = noise_differences(handle, text, seeds, reading, self.batch_size)
        unet_rows = 1 + reading.unet_rows(len(seeds))
        memorized = similarity.max_with_other_seeds(unblocked) > self.threshold_
        memorized_seeds = [seed for seed, flag in zip(seeds, memorized.tolist()) if flag]
        blocked, reached, trace = {name: [] for name in layers}, None, []
        if not memorized_seeds:
            report(callback, "NeMo", 1, 1, "no seed's δ resembles another's: the prompt does not look memorized, "
                                           "nothing blocked")
        else:
            criterion = Criterion(handle, text, memorized_seeds, unblocked[memorized], reading, similarity, layers,
                                  self.batch_size)
            blocked, reached, trace = initial_selection(
                activations, z_scores, criterion, self.threshold_, self.theta_start, self.theta_step,
                self.theta_min, self.settings_["duplicates"], callback)
            if self.refine:
                # When the rounds ran out above τ, refinement keeps the similarity reached instead (as the authors
                # do).
                blocked, reached = refine(blocked, reached, criterion, max(self.threshold_, reached), callback)
            unet_rows += criterion.unet_rows
        result = {f"mask:{name}": removed for name, removed in neuron_masks(blocked, layers).items()}
        return dict(result, memorized_seeds=torch.tensor(memorized_seeds, dtype=torch.int64),
                    similarity=torch.tensor(float("nan") if reached is None else reached, dtype=torch.float64),
                    unet_evaluations=torch.tensor(unet_rows),
                    trace=torch.tensor([[r.theta, r.k, r.similarity] for r in trace],
                                       dtype=torch.float64).reshape(-1, 3),
                    trace_neurons=torch.tensor([list(r.neurons.values()) for r in trace],
                                               dtype=torch.int64).reshape(-1, len(layers)))

    def _reference(self, handle: ModelHandle, layers: dict[str, nn.Linear], reading: DeltaReading,
                   similarity: DeltaSimilarity) -> tuple[Statistics, float]:
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
        return statistics, calibrate_threshold(handle, prompts, self.calibration_seeds, calibration, similarity,
                                               self.cache_dir, self.batch_size)
