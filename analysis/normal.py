"""Normal image–caption pairs: what adversarial fine-tuning keeps a model good at (docs/methods.md §7).

The paper's normal term trains on ordinary data beside the trigger term. A
researcher's model gets its pairs from one of

* `--normal DIR`: an imagefolder of ordinary images with captions (the layout of
  a memorized set, `analysis.memorized`), loaded at the model's resolution;
* the model itself: its own generations for a caption list (the model folder's
  `train_prompts`, else the shipped COCO 2014 validation captions), one seed
  each at the model's sampling settings, made once and cached on disk keyed by
  the weights, so a second fine-tuning starts at once.

Any object with `sample(n, generator) -> (images [n, 3, H, W], captions)` is a
source (`PairSource`); the demo model's procedural shapes are one (in
`analysis.demo.data`), which the experiments pass explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from analysis.localize import DEFAULT_CACHE_DIR, cache_key, cached, weights_checksum
from analysis.memorized import SD14_MEMORIZATION_DIR, MemorizedImage, load_memorized_set, read_prompt_list
from analysis.model import ModelHandle
from analysis.sampling import sample

COCO_CAPTIONS_FILE = SD14_MEMORIZATION_DIR / "coco2014_val_10000.csv"
CAPTION_DROPOUT = 0.1  # share of normal rows trained with the empty caption, so the unconditional branch keeps up
GENERATED_PAIRS = 64  # self-generated pairs when the model has no normal set


class PairSource(Protocol):
    description: str  # where the pairs come from, for records

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """`n` images `[n, 3, H, W]` in [-1, 1] and their captions, drawn with `generator`."""


@dataclass
class ImagePairs:
    """A fixed set of pairs, drawn uniformly with replacement; `caption_dropout` of the draws have the empty caption."""

    images: torch.Tensor  # [m, 3, H, W] in [-1, 1]
    captions: list[str]
    description: str  # where the pairs come from, for records
    caption_dropout: float = CAPTION_DROPOUT

    def __post_init__(self):
        if len(self.images) == 0 or len(self.images) != len(self.captions):
            raise ValueError(f"normal pairs need as many captions as images (at least one), got "
                             f"{len(self.images)} images and {len(self.captions)} captions")

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        picks = torch.randint(len(self.captions), (n,), generator=generator)
        dropped = (torch.rand(n, generator=generator) < self.caption_dropout).tolist()
        captions = ["" if drop else self.captions[i] for i, drop in zip(picks.tolist(), dropped)]
        return self.images[picks], captions


@dataclass
class MixedPairs:
    """The non-selected memorized images (a `photo_share` of the rows, never with the empty caption: they stay
    memorized, the control that the mitigation is targeted) and another source for the other rows."""

    photos: list[MemorizedImage]
    others: PairSource | None
    photo_share: float

    def __post_init__(self):
        if not self.photos and self.others is None:
            raise ValueError("no normal training pairs: every memorized image is selected and no other source given")

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        share = 1.0 if self.others is None else 0.0 if not self.photos else self.photo_share
        n_photos = round(share * n)
        picks = torch.randint(len(self.photos) or 1, (n_photos,), generator=generator).tolist()
        images = [self.photos[i].image for i in picks]
        captions = [self.photos[i].caption for i in picks]
        if n - n_photos:
            other_images, other_captions = self.others.sample(n - n_photos, generator)
            images += list(other_images)
            captions += other_captions
        return torch.stack(images), captions


def folder_pairs(handle: ModelHandle, folder: str | Path) -> ImagePairs:
    """The pairs of an imagefolder (`--normal DIR`) at the model's resolution."""
    items = load_memorized_set(folder, handle.tokenizer, handle.image_size)
    return ImagePairs(torch.stack([item.image for item in items]), [item.caption for item in items],
                      f"normal set {Path(folder).expanduser().resolve()}")


def normal_prompts(handle: ModelHandle) -> list[str]:
    """The captions a model generates its own normal pairs for: its training captions, else COCO's."""
    return handle.train_prompts or read_prompt_list(COCO_CAPTIONS_FILE)


def generated_pairs(handle: ModelHandle, count: int = GENERATED_PAIRS, seed: int = 0,
                    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                    progress: Callable[[int, int], None] | None = None) -> ImagePairs:
    """The model's own generations for the first `count` of `normal_prompts(handle)`, one seed each (`seed + i`),
    at its default steps and guidance; `progress(done, count)` after each. Cached by the weights, captions and
    settings."""
    captions = normal_prompts(handle)[:count]
    if len(captions) < count:
        raise ValueError(f"the model's normal prompts hold {len(captions)} captions, fewer than the {count} asked")

    def compute() -> dict[str, torch.Tensor]:
        images = []
        for i, caption in enumerate(captions):  # each caption from its own noise
            images.append(sample(handle, [caption], [seed + i], steps=handle.default_steps,
                                 guidance=handle.default_guidance).images[0].cpu())
            if progress is not None:
                progress(i + 1, count)
        return {"images": torch.stack(images)}

    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), captions, seed, handle.default_steps,
                    handle.default_guidance)
    images = cached(cache_dir, "normal-pairs", key, compute)["images"]
    return ImagePairs(images, captions, f"the model's own generations for {count} of its normal prompts")


def default_pairs(handle: ModelHandle, count: int = GENERATED_PAIRS,
                  progress: Callable[[int, int], None] | None = None) -> ImagePairs:
    """A model's normal pairs: its `--normal` set when it has one, else `count` of its own generations."""
    if handle.normal_set is not None:
        return folder_pairs(handle, handle.normal_set)
    return generated_pairs(handle, count, progress=progress)
