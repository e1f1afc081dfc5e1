"""Memorization detectors read off one generation, and their distribution over a model's reference prompts.

* "noise_gap": Wen et al. (2024), ‖ε(x_T, y) − ε(x_T, ∅)‖₂ at the first step (`SampleResult.wen_first_step`).
* "attention_entropy": Ren et al.'s (2024, renjie3/MemAttn) detector D: the entropy E = −Σᵢ āᵢ log āᵢ of the
  attention over tokens (āᵢ: token i's cross-attention averaged over pixels, heads and every layer), averaged
  over the last fifth of the steps (their steps 40–49 of 50), plus how much the end and padding tokens' part of
  that sum, −Σ_{i ≥ end} āᵢ log āᵢ, grew from the first step to those steps. An embedding has no end token: its
  last position stands in, as for the bright ending.
* "bright_ending": Chen et al. (2025): the attention to the end token at the last step, averaged over pixels,
  heads and layers (`analysis.attention.end_token_index`: an embedding's last position stands in).

All three come from one sampling pass with the cross-attention captured
(`analysis.attention.capture_attention`), each averaged over the seeds.
`reference_scores` gives each score on a sample of the model's reference prompts
(`analysis.localize.reference_sample`), computed once per weights and settings and cached on disk
(`analysis.localize.cached`), batch by batch: a stopped run keeps the batches it finished, and the next resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from analysis.attention import capture_attention, end_token_index
from analysis.localize import (DEFAULT_CACHE_DIR, ONCE_PER_MODEL, cache_key, cached, reference_sample,
                               weights_checksum)
from analysis.model import ModelHandle
from analysis.progress import Callback, report
from analysis.sampling import DenoisingStep, noise_gap

DETECTORS = ("noise_gap", "attention_entropy", "bright_ending")
# In the reference cache's key: a cached distribution of an older definition of a score is computed again.
DETECTOR_DEFINITIONS = "ren-D-with-padding"
# Beside the scores: Wen et al.'s gap at every step, `[n, steps]` (the curve the Replicate view plots).
NOISE_GAP_PER_STEP = "noise_gap_per_step"
# The seeds every reference distribution is computed with, whatever a run's seeds: one distribution per model.
REFERENCE_SEEDS = (0, 1, 2, 3)
# Ren et al. read the entropy at steps 40-49 of 50: the last fifth.
ENTROPY_SHARE_OF_STEPS = 0.2
# Prompts per sampling pass of the reference set: bounds the memory of one pass.
REFERENCE_BATCH = 16


def entropy_steps(steps: int) -> list[int]:
    """The step indices Ren et al.'s entropy is averaged over: the last fifth (at least one)."""
    count = max(1, round(steps * ENTROPY_SHARE_OF_STEPS))
    return list(range(steps - count, steps))


def detector_scores(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int], steps: int,
                    guidance: float, callback: Callable[[DenoisingStep], None] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every detector's score of each prompt or embedding `[n, 77, d]`, mean over `seeds`: name -> `[n]` float64,
    and `NOISE_GAP_PER_STEP` `[n, steps]`."""
    if guidance == 1.0:
        raise ValueError("the noise gap needs the unconditional prediction: use guidance != 1")
    gaps: list[torch.Tensor] = []

    def record(step: DenoisingStep) -> None:
        gaps.append(noise_gap(step.noise_text, step.noise_uncond).cpu())
        if callback is not None:
            callback(step)

    result, capture = capture_attention(handle, conditioning, seeds, steps, guidance, kept_steps=(), callback=record)
    items = len(conditioning)
    means = torch.stack(capture.token_means).double()  # [steps, rows, tokens]
    prompts = conditioning if isinstance(conditioning, list) else [None] * items
    ends = torch.tensor([end_token_index(handle, prompt) for prompt in prompts]).repeat_interleave(len(seeds))
    terms = -(means * means.clamp_min(1e-30).log())  # [steps, rows, tokens]
    padding = torch.arange(means.shape[-1])[None, :] >= ends[:, None]  # [rows, tokens]: the end token and after
    padding_entropy = (terms * padding).sum(dim=-1)  # [steps, rows]
    late = entropy_steps(steps)
    last = means[-1]
    per_row = dict(noise_gap=result.wen_first_step.double(),
                   attention_entropy=terms.sum(dim=-1)[late].mean(dim=0) + padding_entropy[late].mean(dim=0)
                   - padding_entropy[0],
                   bright_ending=last[torch.arange(len(last)), ends])
    scores = {name: values.view(items, len(seeds)).mean(dim=1) for name, values in per_row.items()}
    scores[NOISE_GAP_PER_STEP] = torch.stack(gaps, dim=1).double().view(items, len(seeds), steps).mean(dim=1)
    return scores


def reference_prompts(handle: ModelHandle) -> list[str]:
    """The prompts the reference distributions are computed on (`analysis.localize.reference_sample`)."""
    if not handle.held_out_prompts:
        raise ValueError("the model has no reference prompts to compare the detectors with")
    return reference_sample(handle)


def reference_scores(handle: ModelHandle, steps: int, guidance: float, seeds: Sequence[int] = REFERENCE_SEEDS,
                     cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                     callback: Callback | None = None) -> dict[str, torch.Tensor]:
    """`detector_scores` of the reference prompts (`reference_prompts`): name -> `[prompts]` (or `[prompts, steps]`).

    Cached per weights of the UNet and text encoder, prompts and settings; the scores are the unmitigated
    model's (a mitigation applied with hooks changes no weight and so no key: compute with `cache_dir=None`).
    Each batch of `REFERENCE_BATCH` prompts is cached as it finishes (`detectors-part-KEY-N`, removed once the
    whole is), so a run stopped part-way (the Stop button, the app's time limit) is resumed, not restarted.
    `callback` receives a `TaskProgress` per denoising step, out of every batch's steps.
    """
    prompts = reference_prompts(handle)
    key = cache_key("detectors", DETECTOR_DEFINITIONS, handle.name, str(handle.dtype),
                    weights_checksum([*handle.unet.parameters(), *handle.text_encoder.parameters()]),
                    prompts, [int(s) for s in seeds], steps, guidance)
    starts = range(0, len(prompts), REFERENCE_BATCH)
    message = f"{len(prompts)} reference prompts × {len(seeds)} seeds ({ONCE_PER_MODEL})"

    def batch(number: int) -> dict[str, torch.Tensor]:
        def progress(step: DenoisingStep) -> None:
            report(callback, "Reference band", number * steps + step.index + 1, len(starts) * steps, message,
                   unit="steps")

        return detector_scores(handle, prompts[starts[number]:starts[number] + REFERENCE_BATCH], seeds, steps,
                               guidance, progress)

    def compute() -> dict[str, torch.Tensor]:
        parts = [cached(cache_dir, "detectors-part", f"{key}-{number}", lambda number=number: batch(number))
                 for number in range(len(starts))]
        return {name: torch.cat([part[name] for part in parts]) for name in (*DETECTORS, NOISE_GAP_PER_STEP)}

    scores = cached(cache_dir, "detectors", key, compute)
    if cache_dir is not None:
        for part in Path(cache_dir).glob(f"detectors-part-{key}-*.safetensors"):
            part.unlink()
    return {name: values.double() for name, values in scores.items()}


def summary(values: torch.Tensor) -> dict:
    """What a reference band shows, over the first dimension: mean, standard deviation, 5/50/95th percentiles, min
    and max (numbers for `[prompts]`, lists per step for `[prompts, steps]`)."""
    values = values.double()
    quantiles = torch.quantile(values, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=0).tolist()
    statistics = dict(mean=values.mean(dim=0), std=values.std(dim=0, correction=0), min=values.amin(dim=0),
                      max=values.amax(dim=0))
    return dict(**{name: value.tolist() for name, value in statistics.items()}, p05=quantiles[0], median=quantiles[1],
                p95=quantiles[2], count=len(values))


def percentile(value: float, reference: torch.Tensor) -> float:
    """The share of reference scores below `value` (ties count one half), in [0, 1]."""
    if math.isnan(value):
        raise ValueError("a detector score is NaN")
    reference = reference.double()
    return ((reference < value).double().mean() + 0.5 * (reference == value).double().mean()).item()
