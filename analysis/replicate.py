"""Does a prompt reproduce a training image? Generate it with several seeds and compare.

`replicate` is what the app's Replicate view, the tests and the command line
call. Its `ReplicationReport` holds the images, each one's similarity to its
nearest training image with a replicated/not verdict, and Wen et al.'s noise
gap ‖ε(x_t, y) − ε(x_t, y0)‖₂ at every denoising step, read off the sampling
loop's own noise predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from analysis.metrics import ReplicationMetric, ReplicationResult
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, noise_gap, sample


@dataclass
class ReplicationReport:
    prompt: str
    seeds: list[int]
    steps: int
    guidance: float
    metric: ReplicationMetric
    threshold: float
    images: torch.Tensor  # [k, 3, H, W] in [-1, 1], one per seed
    # The training images compared with: the chosen one, or every memorized one for a free prompt.
    reference_captions: list[str]
    replication: ReplicationResult | None  # None when the model has no known training images
    noise_gap_per_step: torch.Tensor | None  # [k, steps]; None when guidance == 1 (no unconditional prediction)

    def captions(self) -> list[str]:
        """One line per image: the verdict first (galleries cut long captions), its similarity and its seed."""
        if self.replication is None:
            return [f"seed {seed}" for seed in self.seeds]
        lines = []
        for seed, similarity, replicated, nearest in zip(self.seeds, self.replication.similarities.tolist(),
                                                         self.replication.replicated.tolist(),
                                                         self.replication.nearest.tolist()):
            # With several candidates, say which training image was the nearest.
            to_whom = f" to “{self.reference_captions[nearest]}”" if len(self.reference_captions) > 1 else ""
            verdict = "replicated" if replicated else "not replicated"
            lines.append(f"{verdict} · {self.metric.label()} {similarity:.2f} · seed {seed}{to_whom}")
        return lines

    def summary(self) -> str:
        """The replication rate in words, and Wen et al.'s score of the prompt."""
        if self.replication is None:
            lines = ["This model has no known training images, so replication is not checked."]
        else:
            replicated = int(self.replication.replicated.sum())
            target = "the training image" if len(self.reference_captions) == 1 else "a memorized training image"
            lines = [f"{replicated} of {len(self.seeds)} seeds replicate {target} "
                     f"(rate {self.replication.rate:.0%}; replicated = {self.metric.describe(self.threshold)})."]
        if self.noise_gap_per_step is not None:
            lines.append(f"Wen et al.'s score (noise gap at the first step, mean over seeds): "
                         f"{self.noise_gap_per_step[:, 0].mean():.3f}.")
        return "\n\n".join(lines)


def training_images(handle: ModelHandle) -> torch.Tensor:
    """The model's known memorized training images, `[m, 3, H, W]` in [-1, 1]."""
    return torch.stack([memorized.image for memorized in handle.memorized])


def replicate(handle: ModelHandle, prompt_or_index: str | int, seeds: Sequence[int], steps: int | None = None,
              guidance: float | None = None, threshold: float | None = None,
              callback: Callable[[DenoisingStep], None] | None = None,
              embedding: torch.Tensor | None = None) -> ReplicationReport:
    """Generate `prompt_or_index` with every seed and check each image for replication.

    An int picks a memorized training image: its caption is the prompt and
    its image the one reference. A string is a free prompt, compared with
    every memorized training image (its nearest counts). `embedding` `[77, d]`
    (e.g. a Dori trigger) is generated instead of the prompt's own encoding;
    the prompt or index then says what it is compared with. `steps`,
    `guidance` and the replication `threshold` default to the handle's (its
    `replication_metric` judges). `callback` is passed on to `sample`.
    Raises ValueError for an empty prompt or an index out of range.
    """
    steps = handle.default_steps if steps is None else steps
    guidance = handle.default_guidance if guidance is None else guidance
    metric = handle.replication_metric
    threshold = metric.threshold if threshold is None else threshold
    if isinstance(prompt_or_index, int):
        if not 0 <= prompt_or_index < len(handle.memorized):
            raise ValueError(f"training image {prompt_or_index} does not exist: "
                             f"the model has {len(handle.memorized)} memorized images")
        chosen = handle.memorized[prompt_or_index]
        prompt, references, reference_captions = chosen.caption, chosen.image, [chosen.caption]
    else:
        prompt = prompt_or_index
        if not prompt.strip():
            raise ValueError("the prompt is empty: type a prompt or pick a training image")
        reference_captions = [memorized.caption for memorized in handle.memorized]
        references = training_images(handle) if handle.memorized else None

    gaps: list[torch.Tensor] = []

    def on_step(step: DenoisingStep) -> None:
        if step.noise_uncond is not None:
            gaps.append(noise_gap(step.noise_text, step.noise_uncond).cpu())
        if callback is not None:
            callback(step)

    conditioning = [prompt] if embedding is None else embedding[None].to(handle.device, handle.dtype)
    result = sample(handle, conditioning, seeds, steps=steps, guidance=guidance, callback=on_step)
    return ReplicationReport(
        prompt=prompt, seeds=result.seeds, steps=steps, guidance=guidance, metric=metric, threshold=threshold,
        images=result.images, reference_captions=reference_captions,
        replication=metric(result.images, references, threshold) if references is not None else None,
        noise_gap_per_step=torch.stack(gaps, dim=1) if gaps else None,
    )
