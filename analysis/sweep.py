"""Random perturbation sweep: how far can a prompt's embedding move and still replicate its image?

Draws `directions` Gaussian directions in embedding space, each scaled to unit
L2 norm over the whole embedding `[77, d]`, and generates `y + r · u` for every
radius r and direction u with every seed. The same directions serve every
radius, so a curve over the radii follows fixed rays. Radii are absolute L2
distances; `embedding_norm` (‖y‖) lets a plot show them relative to the embedding.

To sweep a mitigated model, call `perturbation_sweep` inside `with mask.applied(handle):`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analysis.dori import evaluate
from analysis.model import ModelHandle
from analysis.progress import Callback, report
from analysis.sampling import DenoisingStep, encode_prompts


@dataclass
class SweepResult:
    radii: list[float]
    seeds: list[int]
    embedding_norm: float  # ‖y‖₂ of the unperturbed embedding
    similarities: torch.Tensor  # [radii, directions, seeds] similarity of each generation to the image
    replicated: torch.Tensor  # [radii, directions, seeds] bool

    def rates(self) -> torch.Tensor:
        """Share of replicating generations per radius (over directions and seeds), `[radii]`."""
        return self.replicated.float().mean(dim=(1, 2))

    def mean_similarities(self) -> torch.Tensor:
        """Mean similarity per radius, `[radii]`."""
        return self.similarities.mean(dim=(1, 2))

    def direction_rates(self) -> torch.Tensor:
        """Share of replicating seeds per radius and direction, `[radii, directions]`."""
        return self.replicated.float().mean(dim=2)


def random_directions(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """`count` Gaussian directions of `shape`, each of unit L2 norm over all its entries: `[count, *shape]`."""
    directions = torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))
    return directions / directions.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))


def perturbation_sweep(handle: ModelHandle, conditioning: str | torch.Tensor, target_image: torch.Tensor,
                       radii: Sequence[float], directions: int = 4, seeds: Sequence[int] = (0, 1, 2, 3),
                       seed: int = 0, steps: int | None = None, guidance: float | None = None,
                       batch_size: int | None = None, callback: Callback | None = None) -> SweepResult:
    """Replication of `target_image` by `conditioning` (a prompt or an embedding `[77, d]`) perturbed at each radius.

    `seed` draws the directions; `seeds` are the generation seeds; `steps`,
    `guidance` default to the handle's. `callback` receives a `TaskProgress`
    after each radius and after each denoising step (counting radii, the step in its message), and may raise
    `analysis.sampling.SamplingCancelled` to stop.
    """
    if not radii:
        raise ValueError("no radii given")
    embedding = encode_prompts(handle, [conditioning])[0] if isinstance(conditioning, str) else conditioning
    embedding = embedding.to(handle.device, torch.float32)
    rays = random_directions(directions, tuple(embedding.shape), seed).to(handle.device)
    similarities, replicated = [], []
    for done, radius in enumerate(radii, start=1):
        def on_step(step: DenoisingStep, done: int = done, radius: float = radius) -> None:
            report(callback, "sweep", done - 1, len(radii),
                   f"radius {radius:g}: denoising step {step.index + 1} of {step.total}")

        generated = evaluate(handle, embedding + radius * rays, target_image, seeds, steps=steps, guidance=guidance,
                             batch_size=batch_size, callback=on_step if callback is not None else None)
        similarities.append(generated.similarities)
        replicated.append(generated.replicated)
        report(callback, "sweep", done, len(radii), f"radius {radius:g}")
    return SweepResult(radii=[float(r) for r in radii], seeds=[int(s) for s in seeds],
                       embedding_norm=embedding.norm().item(), similarities=torch.stack(similarities),
                       replicated=torch.stack(replicated))
