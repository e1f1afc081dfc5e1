"""The surrogate images the trigger term trains toward: what a mitigated model generates for the caption."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analysis.hooks import hook_points, nemo_layers
from analysis.masks import Mask, generate
from analysis.memorized import MemorizedImage
from analysis.metrics import ReplicationMetric
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep


def whole_layer_masks(handle: ModelHandle, prompt: str) -> list[Mask]:
    """One mask per NeMo value layer that blocks every neuron of it."""
    return [Mask({name: torch.ones(layer.out_features, dtype=torch.bool)}, "whole layer", prompt=prompt,
                 model=handle.name) for name, layer in nemo_layers(handle.unet).items()]


def replicates(metric: ReplicationMetric, images: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether any of `images` replicates `image` by `metric`: a surrogate must not."""
    return bool(metric(images, image).replicated.any())


def mitigated_surrogate(handle: ModelHandle, item: MemorizedImage, surrogate: str | Mask | torch.Tensor,
                        seeds: Sequence[int], callback: Callable[[DenoisingStep], None] | None = None,
                        ) -> tuple[torch.Tensor, str]:
    """Surrogate images `[k, 3, H, W]` for one memorized image and how they were made.

    "mitigated": of the generations of the caption with one whole NeMo value
    layer blocked that replicate on no seed, those least similar to the image;
    with every cross-attention value layer blocked when no single layer stops
    replication. Raises ValueError
    when the chosen surrogate still replicates the image (by the handle's replication metric).
    """
    metric = handle.replication_metric
    if isinstance(surrogate, torch.Tensor):
        images = surrogate[None] if surrogate.ndim == 3 else surrogate
        if images.shape[1:] != item.image.shape:
            raise ValueError(f"surrogate image of shape {tuple(images.shape[1:])} does not match the model's "
                             f"images {tuple(item.image.shape)}")
        candidates = {"the given image": images.float().cpu()}
    elif isinstance(surrogate, Mask):
        candidates = {f"{surrogate.method} mask": generate(handle, [item.caption], seeds, surrogate, callback)}
    elif surrogate == "mitigated":
        candidates = {f"whole layer {next(iter(mask.removed))} blocked": generate(handle, [item.caption], seeds, mask,
                                                                                  callback)
                      for mask in whole_layer_masks(handle, item.caption)}
        if all(replicates(metric, images, item.image) for images in candidates.values()):
            # No single layer stops it (memorization spread over several): block the text's every value path.
            every = Mask({name: torch.ones(layer.out_features, dtype=torch.bool)
                          for name, layer in hook_points(handle.unet, "value").items()},
                         "every value layer", prompt=item.caption, model=handle.name)
            candidates["every cross-attention value layer blocked"] = generate(handle, [item.caption], seeds, every,
                                                                               callback)
    else:
        raise ValueError(f"surrogate must be 'mitigated', a Mask or an image tensor, got {surrogate!r}")
    similarity = {source: metric(images, item.image).similarities for source, images in candidates.items()}
    acceptable = ([name for name, images in candidates.items() if not replicates(metric, images, item.image)]
                  or list(candidates))
    source = min(acceptable, key=lambda name: similarity[name].mean().item())
    worst = similarity[source].max().item()
    if worst > metric.threshold:
        raise ValueError(f"the surrogate for {item.caption!r} ({source}) still replicates the training image "
                         f"({metric.label()} {worst:.2f} > {metric.threshold:g}); fine-tuning toward it would keep "
                         "the image memorized. Pass a Mask that stops replication or an image as `surrogate`.")
    return candidates[source], f"{source}, max {metric.label()} to the training image {worst:.2f}"
