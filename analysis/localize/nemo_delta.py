"""NeMo's noise difference δ and its similarity between seeds, and the threshold τ calibrated on it.

δ = ε(x, t, y) − x, min–max normalised to [0, 1] per image and channel; a
seed counts as memorized when its δ has MS-SSIM > τ with another seed's
(docs/methods.md §4). `DeltaSimilarity` says which MS-SSIM: the authors'
torchmetrics call, or data range 1 at every scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.localize import DEFAULT_CACHE_DIR, cache_key, cached, weights_checksum
from analysis.metrics import ms_ssim
from analysis.model import ModelHandle
from analysis.sampling import (as_embeddings, as_epsilon, ddim_schedule, denoising_steps, encode_prompts,
                               guided_noise, initial_noise, noise_generators, predict_noise)

SCALES = 3  # MS-SSIM scales, as in the authors' code
MS_SSIM_KINDS = ("torchmetrics", "range1")
AUTHORS_EXPONENT = 0.33  # the authors' torchmetrics call: betas=(0.33, 0.33, 0.33)


@dataclass(frozen=True)
class DeltaReading:
    """Where NeMo reads its noise difference δ = ε(x, t, y) − x."""

    steps: int  # of the DDIM schedule
    step_index: int  # t is the schedule's timestep number `step_index` (0-based)
    advance_latents: bool  # x: the latents after `step_index` DDIM steps (True) or x_T itself (False, the authors')
    guidance: float = 1.0  # 1: the text branch alone (the authors' "guidance 0")

    def unet_rows(self, seeds: int) -> int:
        """UNet rows one reading of one prompt with `seeds` seeds costs."""
        return seeds * (self.step_index + 1 if self.advance_latents else 1) * (1 if self.guidance == 1.0 else 2)


@torch.no_grad()
def noise_differences(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int],
                      reading: DeltaReading, batch_size: int | None = None) -> torch.Tensor:
    """NeMo's δ for every (prompt, seed), item-major: `[n * len(seeds), C, h, w]` float32 in [0, 1].

    Min–max normalised per image and channel, as the authors do. Forward hooks
    active around the call act on every UNet evaluation it makes.
    """
    if not 0 <= reading.step_index < reading.steps:
        raise ValueError(f"step_index must be in [0, {reading.steps}), got {reading.step_index}")
    # δ compares the noise ε with x whatever the model predicts: a v-prediction model's output is converted.
    if reading.advance_latents:
        for step in denoising_steps(handle, conditioning, seeds, reading.steps, reading.guidance,
                                    batch_size=batch_size):
            if step.index == reading.step_index:  # the step's noise predictions are ε already
                delta = guided_noise(step.noise_text, step.noise_uncond, reading.guidance) - step.latents
                break
    else:
        text = as_embeddings(handle, conditioning)
        scheduler = ddim_schedule(handle, reading.steps)
        timestep = scheduler.timesteps[reading.step_index]
        noise = initial_noise(handle, noise_generators([seed for _ in range(len(text)) for seed in seeds]))
        x = noise * scheduler.init_noise_sigma
        uncond = None if reading.guidance == 1.0 else encode_prompts(handle, [""])
        noise_text, noise_uncond = predict_noise(handle.unet, scheduler.scale_model_input(x, timestep), timestep,
                                                 text.repeat_interleave(len(seeds), dim=0), uncond, batch_size)
        noise_text = as_epsilon(scheduler, noise_text, x, timestep)
        noise_uncond = None if noise_uncond is None else as_epsilon(scheduler, noise_uncond, x, timestep)
        delta = guided_noise(noise_text, noise_uncond, reading.guidance) - x
    delta = delta.float()
    low, high = delta.amin(dim=(2, 3), keepdim=True), delta.amax(dim=(2, 3), keepdim=True)
    # A channel that is constant (never seen in practice) maps to 0 instead of 0/0.
    return (delta - low) / (high - low).clamp_min(1e-12)


@dataclass(frozen=True)
class DeltaSimilarity:
    """The MS-SSIM NeMo compares δ with: `window`, `scales` and `kind`.

    "torchmetrics": as the authors' call of torchmetrics'
    `multiscale_structural_similarity_index_measure` computes it: the data
    range inferred at each scale from the whole batch of pairs compared
    together, exponents 0.33. "range1": data range 1 at every scale (δ is in
    [0, 1]), exponents 1/scales.
    """

    window: int
    scales: int = SCALES
    kind: str = "range1"

    def __post_init__(self):
        if self.kind not in MS_SSIM_KINDS:
            raise ValueError(f"unknown NeMo MS-SSIM {self.kind!r}; choose one of {MS_SSIM_KINDS}")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """MS-SSIM of δ pairs `[n, C, h, w]` each: `[n]` (with "torchmetrics", of these n pairs together)."""
        if self.kind == "torchmetrics":
            return ms_ssim(a, b, self.scales, self.window, data_range=None, exponent=AUTHORS_EXPONENT)
        return ms_ssim(a, b, self.scales, self.window, data_range=1.0)

    def key(self) -> str:
        """How this similarity is named in cache keys."""
        return f"ms_ssim-{self.scales}-{self.window}-" + ("torchmetrics" if self.kind == "torchmetrics" else
                                                          "range1.0")

    def max_with_other_seeds(self, deltas: torch.Tensor) -> torch.Tensor:
        """For each δ of `[n, C, h, w]` (one prompt, n seeds), its highest MS-SSIM with any other: `[n]`.

        All pairs are compared in one batch, as the authors do.
        """
        pairs = torch.combinations(torch.arange(len(deltas)), r=2)
        similarities = self(deltas[pairs[:, 0]], deltas[pairs[:, 1]])
        best = torch.full((len(deltas),), -1.0)
        for column in (0, 1):
            best = best.scatter_reduce(0, pairs[:, column], similarities, reduce="amax")
        return best


def calibrate_threshold(handle: ModelHandle, prompts: Sequence[str], seeds: Sequence[int], reading: DeltaReading,
                        similarity: DeltaSimilarity, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                        batch_size: int | None = None) -> float:
    """τ = mean + 1 std of the pairwise MS-SSIM between the δ of different seeds of each non-memorized prompt.

    A prompt's pairs are compared in one batch (the authors' 45 pairs of 10
    seeds). Cached per model weights, prompts, seeds, reading and similarity.
    """
    seeds = [int(seed) for seed in seeds]

    def compute() -> dict[str, torch.Tensor]:
        deltas = noise_differences(handle, list(prompts), seeds, reading, batch_size)
        pairs = torch.combinations(torch.arange(len(seeds)), r=2)
        similarities = torch.cat([similarity(per_prompt[pairs[:, 0]], per_prompt[pairs[:, 1]])
                                  for per_prompt in deltas.split(len(seeds))])
        return {"threshold": similarities.mean() + similarities.std()}

    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), list(prompts), seeds,
                    [reading.steps, reading.step_index, reading.advance_latents, reading.guidance], similarity.key())
    return cached(cache_dir, "nemo-threshold", key, compute)["threshold"].item()
