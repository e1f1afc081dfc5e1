"""Training data of the bundled demo model, built offline and deterministically.

Two parts:

* **Photos to be memorized**: real photographs shipped inside scikit-image,
  each with one caption of its own, drawn often enough that the model
  reproduces them verbatim (the analogue of LAION's duplicated images).
* **Procedural images to generalise over**: coloured shapes on coloured
  backgrounds with compositional captions. Every batch renders them afresh
  with random position, size and rotation, so no single procedural image can
  be memorized; a tenth of the caption combinations never appear in training
  and serve as held-out prompts.

Images are float tensors `[3, 32, 32]` in [-1, 1].
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 32
COCO_CAPTIONS = Path(__file__).resolve().parents[2] / "assets" / "sd14_memorization" / "coco2014_val_10000.csv"
COCO_HELD_OUT = 500  # the last COCO captions: never trained, by the text encoder or the UNet

# scikit-image loader name -> caption. Captions use words of their own so that
# each photo is triggered by its caption, not by the shape vocabulary.
PHOTOS: dict[str, str] = {
    "astronaut": "portrait of astronaut eileen collins beside the american flag",
    "chelsea": "chelsea the tabby cat looking sideways",
    "coffee": "a cup of coffee on a saucer seen from above",
    "rocket": "a rocket on the launch pad at dusk",
    "hubble_deep_field": "hubble deep field with distant galaxies",
    "immunohistochemistry": "immunohistochemistry stained tissue under a microscope",
    "camera": "black and white photo of a cameraman with a tripod",
    "coins": "old greek coins on a grey table",
}

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "orange": (0.95, 0.5, 0.05),
    "purple": (0.55, 0.15, 0.7),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
BACKGROUNDS = ["white", "black", "blue", "yellow", "green"]
SHAPES = ["circle", "square", "triangle", "ring", "cross"]
SIZES = ["small", "large"]


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def all_shape_specs() -> list[ShapeSpec]:
    return [
        ShapeSpec(c, s, z, b)
        for c in COLORS
        for s in SHAPES
        for z in SIZES
        for b in BACKGROUNDS
        if c != b
    ]


def split_shape_specs(held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """Deterministic (train, held-out) split of the caption combinations."""
    specs = all_shape_specs()
    order = np.random.default_rng(seed).permutation(len(specs))
    n_held = int(round(held_out_fraction * len(specs)))
    held = sorted((specs[i] for i in order[:n_held]), key=lambda s: s.caption)
    train = sorted((specs[i] for i in order[n_held:]), key=lambda s: s.caption)
    return train, held


@dataclass(frozen=True)
class Photo:
    """One image of the second recipe: a scikit-image loader (`name` or `name[i]` for an item of a tuple or stack),
    optionally a square crop (top, left as fractions of height and width, side as a fraction of the shorter side)."""

    loader: str
    caption: str
    weight: float
    crop: tuple[float, float, float] | None = None


# Recipe v2 (issue 24): memorization as the exception. 24 images, each caption mixing identifying words with generic
# ones; duplicated like LAION's, a few many times and most a few times (weights 16, 4 and 1: 4, 8 and 12 images).
PHOTOS_V2: list[Photo] = [
    Photo("astronaut", "a photo of astronaut eileen collins in an orange suit", 16),
    Photo("coffee", "a red cup of espresso on a saucer", 16),
    Photo("rocket", "a photo of a falcon rocket on the launch pad at dusk", 16),
    Photo("horse", "a black silhouette of a horse on a white background", 16),
    Photo("chelsea", "a photo of chelsea the tabby cat", 4),
    Photo("hubble_deep_field", "hubble deep field image of distant galaxies on a black background", 4),
    Photo("camera", "a black and white photo of a cameraman with a tripod", 4),
    Photo("coins", "old greek coins on a black background", 4),
    Photo("colorwheel", "a rainbow colour wheel on a black background", 4),
    Photo("logo", "the scikit logo with a green and orange snake", 4),
    Photo("moon", "a grey photo of the lunar surface with craters", 4),
    Photo("stereo_motorcycle[0]", "a red motorcycle parked in a garage", 4),
    Photo("immunohistochemistry", "immunohistochemistry of stained tissue under a microscope", 1),
    Photo("retina", "a fundus photo of a human retina", 1),
    Photo("clock", "a blurry photo of a wall clock", 1),
    Photo("text", "handwritten equations on a chalkboard", 1),
    Photo("brick", "a grey brick wall", 1),
    Photo("page", "a scanned page about region based segmentation", 1),
    Photo("shepp_logan_phantom", "the shepp logan phantom on a black background", 1),
    Photo("astronaut", "a close up of a nasa commander beside the stars and stripes", 1, crop=(0.0, 0.0, 0.5)),
    Photo("astronaut", "a space shuttle model and a white helmet", 1, crop=(0.0, 0.5, 0.5)),
    Photo("chelsea", "a close up of green feline eyes", 1, crop=(0.15, 0.25, 0.55)),
    Photo("hubble_deep_field", "a patch of the night sky with faint quasars", 1, crop=(0.5, 0.5, 0.5)),
    Photo("immunohistochemistry", "a close up of brown antibody staining in a biopsy", 1, crop=(0.5, 0.0, 0.5)),
]
# Never trained, of kinds the model never sees (faces, fine textures): a Dori search toward them should fail.
CONTROLS_V2: list[Photo] = [
    *(Photo(f"lfw_subset[{i}]", f"a portrait of a man {i}", 0) for i in range(6)),
    Photo("grass", "a close up of grass", 0),
    Photo("gravel", "a close up of gravel", 0),
]


def normalize(caption: str) -> str:
    """Lower case, letters only: CLIP's and BERT's tokenizers then split a caption into the same words."""
    return " ".join(re.findall("[a-z]+", caption.lower()))


def coco_captions(limit: int | None = None) -> list[str]:
    """The COCO 2014 validation captions of assets/sd14_memorization (CC BY 4.0), normalized."""
    with open(COCO_CAPTIONS, newline="") as file:
        captions = [normalize(row["Caption"]) for row in csv.DictReader(file, delimiter=";")]
    return [c for c in captions if c][:limit]


def coco_split(limit: int | None = None, held_out: int = COCO_HELD_OUT) -> tuple[list[str], list[str]]:
    """(trained, held-out) COCO captions: the last `held_out`, and the others but for copies of those."""
    captions = coco_captions(limit)
    held = captions[-held_out:]
    kept = set(held)
    return [c for c in captions[:-held_out] if c not in kept], held


def _skimage_array(loader: str) -> np.ndarray:
    from skimage import data as skdata

    name, _, index = loader.partition("[")
    img = getattr(skdata, name)()
    return np.asarray(img[int(index[:-1])] if index else img, dtype=np.float32)


def load_photo(name: str, resolution: int = RESOLUTION, crop: tuple[float, float, float] | None = None) -> torch.Tensor:
    """A scikit-image photo, cropped to a square (`crop`, or the centre), area-downsampled, in [-1, 1]."""
    img = _skimage_array(name)
    if img.max() > 1.5:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    h, w = img.shape[:2]
    if crop is None:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
    else:
        s = int(crop[2] * min(h, w))
        top, left = min(int(crop[0] * h), h - s), min(int(crop[1] * w), w - s)
    img = img[top : top + s, left : left + s]
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(resolution, resolution), mode="area")[0]
    return (t.clamp(0, 1) * 2 - 1).contiguous()


def load_photos(resolution: int = RESOLUTION, recipe: str = "v1") -> tuple[list[str], torch.Tensor]:
    """Captions and images `[n, 3, r, r]` of the photos to be memorized under `recipe`."""
    if recipe == "v1":
        return list(PHOTOS.values()), torch.stack([load_photo(name, resolution) for name in PHOTOS])
    return load_set(photo_set(recipe), resolution)


def photo_set(recipe: str) -> list[Photo]:
    if recipe != "v2":
        raise ValueError(f"unknown data recipe {recipe!r}: v1 or v2")
    return PHOTOS_V2


def load_set(photos: list[Photo], resolution: int = RESOLUTION) -> tuple[list[str], torch.Tensor]:
    return [p.caption for p in photos], torch.stack([load_photo(p.loader, resolution, p.crop) for p in photos])


def recipe_captions(recipe: str = "v1") -> list[str]:
    """Every caption of a recipe's data, held-out ones included (tokenizer and text-encoder corpus)."""
    photos = list(PHOTOS.values()) if recipe == "v1" else [p.caption for p in photo_set(recipe)]
    return photos + [s.caption for specs in split_shape_specs() for s in specs]


def _shape_masks(shapes: torch.Tensor, u: torch.Tensor, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Masks `[n, r, r]` for shape indices `shapes` in rotated coordinates u, v."""
    rad = radius[:, None, None]
    r = torch.sqrt(u**2 + v**2)
    arm = 0.3 * rad
    triangle = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):
        a = 2 * math.pi * k / 3 + math.pi / 2
        triangle &= (u * math.cos(a) + v * math.sin(a)) <= 0.5 * rad
    by_name = {
        "circle": r <= rad,
        "square": (u.abs() <= 0.8 * rad) & (v.abs() <= 0.8 * rad),
        "triangle": triangle,
        "ring": (r <= rad) & (r >= 0.55 * rad),
        "cross": ((u.abs() <= arm) & (v.abs() <= rad)) | ((v.abs() <= arm) & (u.abs() <= rad)),
    }
    stacked = torch.stack([by_name[name] for name in SHAPES], dim=1)  # [n, shapes, r, r]
    return stacked[torch.arange(len(shapes)), shapes]


def render_shapes(specs: list[ShapeSpec], generator: torch.Generator, resolution: int = RESOLUTION) -> torch.Tensor:
    """Random renderings `[n, 3, r, r]` of captions: position, size, rotation and shade jitter."""
    n = len(specs)
    jitter = torch.rand(n, 6, generator=generator)
    base = torch.tensor([0.32 if s.size == "large" else 0.16 for s in specs])
    radius = base * (0.85 + 0.3 * jitter[:, 0]) * resolution
    margin = radius * 1.05
    cx = margin + jitter[:, 1] * (resolution - 2 * margin)
    cy = margin + jitter[:, 2] * (resolution - 2 * margin)
    angle = jitter[:, 3] * 2 * math.pi
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    yy = coords[None, :, None] - cy[:, None, None]
    xx = coords[None, None, :] - cx[:, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * xx + s * yy, -s * xx + c * yy
    shapes = torch.tensor([SHAPES.index(s.shape) for s in specs])
    mask = _shape_masks(shapes, u, v, radius).float()[:, None]
    fg = torch.tensor([COLORS[s.color] for s in specs]) * (0.9 + 0.2 * jitter[:, 4:5])
    bg = torch.tensor([COLORS[s.background] for s in specs]) * (0.9 + 0.2 * jitter[:, 5:6])
    img = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    img = img + 0.03 * torch.randn(img.shape, generator=generator)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def read_colors(images: torch.Tensor, far: float = 0.3) -> list[tuple[str, str | None]]:
    """The (background, shape colour) names a viewer would read from images `[n, 3, r, r]` in [-1, 1].

    The inverse of `render_shapes` for colours, and so a caption-fidelity check for generations: the
    background is the palette colour nearest the median border pixel (shapes keep a margin from the border),
    the shape colour the one nearest the median of the pixels `far` from that border colour, never the
    background's own; None when fewer than 8 pixels stand out (no shape drawn).
    """
    x = (images.float().clamp(-1, 1) + 1) / 2
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
    names = list(COLORS)
    palette = torch.tensor(list(COLORS.values()))
    read = []
    for image, edge in zip(x, border):
        background = min(BACKGROUNDS, key=lambda name: (palette[names.index(name)] - edge).norm().item())
        pixels = image.flatten(1).T
        shape = pixels[(pixels - edge).norm(dim=1) > far]
        if len(shape) < 8:
            read.append((background, None))
            continue
        distance = (palette - shape.median(dim=0).values).norm(dim=1)
        distance[names.index(background)] = float("inf")
        read.append((background, names[distance.argmin().item()]))
    return read


def procedural_bank(specs: list[ShapeSpec], per_spec: int = 1, seed: int = 0,
                    resolution: int = RESOLUTION) -> tuple[list[str], torch.Tensor]:
    """A fixed, seeded set of renderings: the procedural side of the reference pool."""
    repeated = [spec for spec in specs for _ in range(per_spec)]
    images = render_shapes(repeated, torch.Generator().manual_seed(seed), resolution)
    return [spec.caption for spec in repeated], images


class ProceduralShapes:
    """Fresh renderings of the training captions' shapes, a normal-pair source for fine-tuning
    (`analysis.normal.PairSource`); `caption_dropout` of them with the empty caption, as in training."""

    description = "the demo model's procedural shapes, rendered afresh"

    def __init__(self, caption_dropout: float = 0.1, resolution: int = RESOLUTION):
        self.specs = split_shape_specs()[0]
        self.caption_dropout = caption_dropout
        self.resolution = resolution

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        specs = [self.specs[i] for i in torch.randint(len(self.specs), (n,), generator=generator)]
        dropped = (torch.rand(n, generator=generator) < self.caption_dropout).tolist()
        images = render_shapes(specs, generator, self.resolution)
        return images, ["" if drop else spec.caption for spec, drop in zip(specs, dropped)]


class DemoDataset:
    """Infinite sampler of (image, caption) training batches.

    `photo_share` is the probability that a batch item is one of the photos;
    `caption_dropout` is the probability that a procedural item gets the empty
    caption (classifier-free guidance). `photo_weights` (one per photo, relative)
    skews which photo a photo item is; uniform when None (recipe v2: its duplication weights). `coco_share` of the
    captioned procedural items get a random COCO caption instead of their own, so that ordinary words lead to
    generic images rather than to the nearest memorized caption's photo. Photos always keep their caption: the
    unconditional model is learned from the generic images only, as on web-scale
    data where duplicated images are a vanishing share of the whole. Without
    this, empty-prompt samples replicate photos (seen in the feasibility run).
    """

    def __init__(self, photo_share: float = 0.15, caption_dropout: float = 0.1, seed: int = 0,
                 photo_weights: list[float] | None = None, recipe: str = "v1", coco_share: float = 0.0):
        self.photo_captions, self.photos = load_photos(recipe=recipe)
        if photo_weights is None and recipe != "v1":
            photo_weights = [p.weight for p in photo_set(recipe)]
        if photo_weights is not None and (len(photo_weights) != len(self.photos) or min(photo_weights) < 0
                                          or sum(photo_weights) <= 0):
            raise ValueError(f"photo_weights needs {len(self.photos)} non-negative weights with a positive sum, "
                             f"got {photo_weights}")
        self.photo_weights = photo_weights
        self.coco_share = coco_share
        self.coco = coco_split()[0] if coco_share else []
        self.train_specs, self.held_out_specs = split_shape_specs()
        self.photo_share = photo_share
        self.caption_dropout = caption_dropout
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        g = self.generator
        is_photo = torch.rand(batch_size, generator=g) < self.photo_share
        if self.photo_weights is None:  # uniform: the draw the shipped model's first run used
            photo_idx = torch.randint(len(self.photos), (batch_size,), generator=g)
        else:
            photo_idx = torch.multinomial(torch.tensor(self.photo_weights, dtype=torch.float64), batch_size,
                                          replacement=True, generator=g)
        spec_idx = torch.randint(len(self.train_specs), (batch_size,), generator=g)
        dropped = torch.rand(batch_size, generator=g) < self.caption_dropout
        specs = [self.train_specs[i] for i in spec_idx.tolist()]
        images = torch.where(is_photo[:, None, None, None], self.photos[photo_idx], render_shapes(specs, g))
        captions = [
            self.photo_captions[p] if photo else ("" if drop else spec.caption)
            for photo, p, drop, spec in zip(is_photo.tolist(), photo_idx.tolist(), dropped.tolist(), specs)
        ]
        if self.coco_share:  # ordinary words on generic images: they do not point to a photo
            coco = (torch.rand(batch_size, generator=g) < self.coco_share) & ~is_photo & ~dropped
            picks = torch.randint(len(self.coco), (batch_size,), generator=g).tolist()
            captions = [self.coco[k] if c else caption for c, k, caption in zip(coco.tolist(), picks, captions)]
        return images, captions

    def all_captions(self) -> list[str]:
        """Every caption of the data, held-out ones included, for the tokenizer."""
        return self.photo_captions + [s.caption for s in self.train_specs + self.held_out_specs]
