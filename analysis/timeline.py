"""The denoising timeline of one seed: the clean image x̂₀ the model predicts at every step, and its similarity
to the training image by the model's replication metric. When does the copy lock in?

The frames are the scheduler's own `pred_original_sample` of each step of
`analysis.sampling.sample` (read through its step callback), decoded like the
final image. DDIM's last step moves to x̂₀ itself when the schedule's final
ᾱ is 1 (`set_alpha_to_one`); otherwise the image differs from the last x̂₀ by
DDIM's remaining √(1 − ᾱ₀)·ε term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, sample


@dataclass
class Timeline:
    frames: torch.Tensor  # [steps, 3, H, W] in [-1, 1]: decoded x̂₀ of every step
    image: torch.Tensor  # [3, H, W] the generated image
    timesteps: list[int]
    similarities: torch.Tensor | None  # [steps] similarity of each frame to the target (nearest training image)
    final_similarity: float | None  # of the generated image

    def lock_in_step(self, threshold: float) -> int | None:
        """The first step from which every later frame and the image stay above `threshold`; None if none does."""
        if self.similarities is None:
            return None
        above = (self.similarities > threshold).tolist() + [self.final_similarity > threshold]
        if not above[-1]:
            return None
        step = len(above) - 1
        while step > 0 and above[step - 1]:
            step -= 1
        return step if step < len(self.similarities) else None


def denoising_timeline(handle: ModelHandle, conditioning: str | torch.Tensor, seed: int, steps: int,
                       guidance: float, target: torch.Tensor | None = None,
                       callback: Callable[[DenoisingStep], None] | None = None) -> Timeline:
    """The timeline of a prompt or an embedding `[77, d]` for one seed. `target`: an image `[3, H, W]` or
    several `[m, 3, H, W]` (the nearest counts), compared by `handle.replication_metric`; None: no similarities."""
    frames: list[torch.Tensor] = []
    timesteps: list[int] = []

    def record(step: DenoisingStep) -> None:
        frames.append(handle.decode_latents(step.predicted_original).float().cpu()[0])
        timesteps.append(int(step.timestep))
        if callback is not None:
            callback(step)

    batch = [conditioning] if isinstance(conditioning, str) else conditioning[None]
    result = sample(handle, batch, [seed], steps=steps, guidance=guidance, callback=record)
    stacked = torch.stack(frames)
    similarities = final = None
    if target is not None:
        references = target[None] if target.ndim == 3 else target
        both = handle.replication_metric(torch.cat([stacked, result.images]), references.float().cpu()).similarities
        similarities, final = both[:-1], both[-1].item()
    return Timeline(stacked, result.images[0], timesteps, similarities, final)
