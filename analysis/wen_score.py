"""Wen et al.'s (2024) reference-free memorization score: how far the text moves the first noise predictions
(docs/methods.md §3).

    ‖ε(x_t, t, y) − ε(x_t, t, ∅)‖₂, averaged over seeds and the first steps of sampling.

Memorized prompts move the prediction much more than ordinary ones; the score needs no training image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.model import ModelHandle
from analysis.sampling import as_epsilon, denoising_steps, noise_gap, predict_noise


def wen_magnitude(handle: ModelHandle, x_t: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor,
                  y0: torch.Tensor) -> torch.Tensor:
    """‖ε(x_t, t, y) − ε(x_t, t, y0)‖₂ per image, `[b]` (Wen et al. 2024). Differentiable in `y`.

    `x_t` `[b, C, h, w]`, `y` `[b, 77, d]`, `y0` `[1 or b, 77, d]` (the empty prompt's embedding). ε as
    `analysis.sampling.as_epsilon` reads the handle's UNet output (a v-prediction model's v is converted).
    """
    noise_text, noise_uncond = predict_noise(handle.unet, x_t, t, y, y0)
    return noise_gap(as_epsilon(handle.scheduler, noise_text, x_t, t), as_epsilon(handle.scheduler, noise_uncond, x_t, t))


def wen_score(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int] = (0, 1, 2, 3),
              steps: int = 50, n_score_steps: int = 1, guidance: float = 7.0,
              batch_size: int | None = None) -> torch.Tensor:
    """Wen et al.'s magnitude at each of the first `n_score_steps` steps, mean over seeds: `[n_items, n_score_steps]`.

    Runs the first steps of the sampling loop (`denoising_steps`: same noise, same guided
    trajectory as `sample`) and stops; the magnitude is `wen_magnitude`'s, read off the noise predictions
    the loop already made. The paper's score is the mean over the returned steps.
    """
    if guidance == 1.0:
        raise ValueError("the Wen score needs the unconditional prediction: use guidance != 1")
    if not 1 <= n_score_steps <= steps:
        raise ValueError(f"n_score_steps must be in [1, {steps}], got {n_score_steps}")
    per_step = []
    for step in denoising_steps(handle, conditioning, seeds, steps, guidance, batch_size=batch_size):
        per_step.append(noise_gap(step.noise_text, step.noise_uncond).cpu())
        if len(per_step) == n_score_steps:
            break
    norms = torch.stack(per_step, dim=1)  # [items * seeds, n_score_steps]
    return norms.view(-1, len(seeds), n_score_steps).mean(dim=1)
