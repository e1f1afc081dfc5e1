"""Image similarity, replication and memorization scores (docs/methods.md §2–3).

* `similarity_matrix`: the built-in similarity (pixel correlation), needs no download.
* `ssim`, `ms_ssim`: structural similarity, single- and multi-scale, for noise maps (NeMo).
* `SSCD`: the literature's copy-detection similarity, from a TorchScript file the user supplies.
* `replication`, `memorization_rate`: is a training image reproduced, and how often.
* `ReplicationMetric`: the similarity and threshold a model's replication is judged with (`replication_metric`
  builds it: pixel correlation > 0.75, or SSCD > 0.7 from a TorchScript file).
* `roc_auc`: how well a score separates memorized from normal prompts.

Images are `[n, 3, H, W]` in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F


# Calibrated on the demo model (memorized vs held-out generations): docs/results/memorization.md.
REPLICATION_THRESHOLD = 0.75
# The literature's SSCD threshold for a replica (Somepalli et al. 2023; Wen et al. 2024; Kowalczuk et al. 2025).
SSCD_THRESHOLD = 0.7

SSIM_WINDOW = 7  # small enough for 32x32 images
SSIM_SIGMA = 1.5
SSCD_SIZE = 320  # SSCD's README "skew_320": resize straight to 320x320, ignoring aspect ratio
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Similarity(Protocol):
    """Any image similarity usable for replication: (generated [n, ...], references [m, ...]) -> [n, m]."""

    def __call__(self, generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{name} must be images [n, C, H, W], got shape {tuple(images.shape)}")


def _ssim_maps(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float,
               data_range: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM's luminance and contrast-structure maps of image pairs (valid region, per channel)."""
    _check_images(a, "a")
    _check_images(b, "b")
    a, b = torch.broadcast_tensors(a.float(), b.float())
    channels, height, width = a.shape[1:]
    if min(height, width) < window:
        raise ValueError(f"images of {height}x{width} are smaller than the {window}x{window} SSIM window")
    coords = torch.arange(window, dtype=torch.float32, device=a.device) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    # A variance is never negative; rounding can make the difference so where an image is flat.
    var_a = (local_mean(a * a) - mu_a**2).clamp_min(0)
    var_b = (local_mean(b * b) - mu_b**2).clamp_min(0)
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1), (2 * cov + c2) / (var_a + var_b + c2)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
         data_range: float = 2.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of image pairs, `[n, C, H, W]` each (a batch of 1 broadcasts) -> `[n]`.

    Gaussian-weighted local statistics without padding, per channel, then
    averaged over pixels and channels. Constants K1 = 0.01, K2 = 0.03 times
    `data_range`, the span of the values: 2 for images in [-1, 1], 1 for maps
    in [0, 1] (NeMo's noise differences).
    """
    luminance, contrast_structure = _ssim_maps(a, b, window, sigma, data_range)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int = 3, window: int = SSIM_WINDOW,
            sigma: float = SSIM_SIGMA, data_range: float | None = 2.0, exponent: float | None = None) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) of image pairs -> `[n]`, equal weight per scale.

    Contrast-structure at every scale, luminance at the coarsest, each scale
    averaged over pixels and channels, clamped at 0 and halved by 2x2 average
    pooling, combined as the product of each scale's value to the power
    `exponent` (None: 1/scales, the geometric mean). `data_range` as in
    `ssim`; None infers it at each scale as torchmetrics'
    `multiscale_structural_similarity_index_measure` does: the larger span
    (max − min) of `a` and of `b`, each over the whole batch, so that a pair's
    value depends on the pairs beside it. NeMo's code calls torchmetrics with
    3 scales, exponents 0.33 and no data range; 3 scales of a 7x7 window fit
    32x32 images (the coarsest is 8x8).
    """
    if scales < 1:
        raise ValueError(f"scales must be at least 1, got {scales}")
    per_scale = []
    for scale in range(scales):
        scale_range = data_range
        if data_range is None:
            scale_range = torch.maximum(a.amax() - a.amin(), b.amax() - b.amin()).float()
        luminance, contrast_structure = _ssim_maps(a, b, window, sigma, scale_range)
        coarsest = scale == scales - 1
        value = (luminance * contrast_structure if coarsest else contrast_structure).mean(dim=(1, 2, 3))
        per_scale.append(value.clamp_min(0))
        if not coarsest:
            a, b = F.avg_pool2d(a.float(), 2), F.avg_pool2d(b.float(), 2)
    return torch.stack(per_scale).pow(1 / scales if exponent is None else exponent).prod(dim=0)


def similarity_matrix(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Pixel correlation of every generated image with every reference: `[n, m]`. The default `Similarity`.

    Pearson correlation over all pixels and channels, in [-1, 1]. It ignores
    global brightness and contrast, which classifier-free guidance inflates,
    and scores the layout of a copy. On the 32x32 demo model it separates
    memorized from held-out generations better than SSIM (measured in
    docs/results/memorization.md); SSCD stays the choice for SD-sized images.
    """
    _check_images(generated, "generated")
    _check_images(references, "references")
    if generated.shape[1:] != references.shape[1:]:
        raise ValueError(f"generated {tuple(generated.shape[1:])} and references {tuple(references.shape[1:])} differ in shape")
    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(1)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)
    return standardise(generated) @ standardise(references).T


def paired_similarity(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean pixel correlation of each image of `before` with its counterpart in `after`: 1 = unchanged."""
    return similarity_matrix(before, after).diag().mean().item()


class SSCD:
    """SSCD copy-detection similarity (Pizzi et al. 2022): cosine similarity of its descriptors.

    `path` is a TorchScript file from https://github.com/facebookresearch/sscd-copy-detection
    (the memorization papers use `sscd_disc_mixup.torchscript.pt`). Preprocessing
    follows SSCD's README: resize to 320x320, ImageNet normalisation.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", size: int = SSCD_SIZE):
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no SSCD TorchScript file at {path.resolve()}; download e.g. sscd_disc_mixup.torchscript.pt "
                "from https://github.com/facebookresearch/sscd-copy-detection")
        self.path = path.resolve()
        self.device = torch.device(device)
        self.size = size
        try:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{self.path} is not a TorchScript file SSCD can be loaded from: {err}") from err

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[n, 3, H, W]` in [-1, 1] -> unit-length descriptors `[n, D]`."""
        _check_images(images, "images")
        x = (images.to(self.device, torch.float32) + 1) / 2
        # Antialiased like the PIL resize in SSCD's reference preprocessing.
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]
        return F.normalize(self.model((x - mean) / std), dim=1)

    def __call__(self, generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return (self.embed(generated) @ self.embed(references).T).cpu()


@dataclass
class ReplicationResult:
    similarities: torch.Tensor  # [k] similarity of each generation to its nearest reference
    replicated: torch.Tensor  # [k] bool: similarity > threshold
    rate: float  # share of the k generations that replicate
    nearest: torch.Tensor  # [k] index of each generation's nearest reference


def replication(generated: torch.Tensor, reference: torch.Tensor, threshold: float = REPLICATION_THRESHOLD,
                similarity: Similarity = similarity_matrix) -> ReplicationResult:
    """Do the generations `[k, 3, H, W]` reproduce a training image?

    `reference` is one image `[3, H, W]` or several `[m, 3, H, W]`; with several,
    each generation is compared with its nearest one (max similarity). A
    generation replicates when its similarity exceeds `threshold` (strictly, as
    "SSCD > 0.7" in the literature).
    """
    references = reference[None] if reference.ndim == 3 else reference
    best = similarity(generated, references).max(dim=1)
    similarities = best.values.float().cpu()
    replicated = similarities > threshold
    return ReplicationResult(similarities, replicated, replicated.float().mean().item(), best.indices.cpu())


@dataclass(frozen=True)
class ReplicationMetric:
    """How replication is judged: a similarity, its name, and the threshold above which a generation is a replica.

    A model handle carries one (`ModelHandle.replication_metric`), so that every analysis of that model, and
    every result and export, uses and names the same metric. Build it with `replication_metric`.
    """

    name: str  # "pixel correlation" or "SSCD"
    threshold: float
    similarity: Similarity = similarity_matrix
    file: str | None = None  # the SSCD TorchScript file

    def __call__(self, generated: torch.Tensor, reference: torch.Tensor,
                 threshold: float | None = None) -> ReplicationResult:
        """`replication` with this metric (and its threshold unless `threshold` is given)."""
        return replication(generated, reference, self.threshold if threshold is None else threshold, self.similarity)

    def label(self) -> str:
        """What a plot axis or table column of this similarity is called."""
        return similarity_label(self.name)

    def describe(self, threshold: float | None = None) -> str:
        """The replica criterion in words, e.g. "SSCD similarity > 0.7"."""
        return f"{self.label()} > {self.threshold if threshold is None else threshold:g}"

    def settings(self) -> dict:
        """JSON settings `replication_metric` builds this metric from again (what records and exports keep)."""
        return dict(metric=self.name, threshold=self.threshold, sscd=self.file)


PIXEL_CORRELATION = ReplicationMetric("pixel correlation", REPLICATION_THRESHOLD)


def similarity_label(metric: str) -> str:
    """How results name the similarity of the metric called `metric` (a record's `replication.metric`)."""
    return f"similarity ({metric})"


def replication_metric(sscd: str | Path | None = None, threshold: float | None = None,
                       device: str | torch.device = "cpu", metric: str | None = None) -> ReplicationMetric:
    """Pixel correlation (threshold 0.75), or SSCD from the TorchScript file `sscd` (threshold 0.7) on `device`.

    `threshold` overrides the metric's. `metric` is the name `settings()` recorded (checked against `sscd`), so
    that `replication_metric(**metric.settings())` builds the metric again. ValueError for a file that cannot be
    loaded or a threshold outside [-1, 1]; FileNotFoundError for a missing file.
    """
    if threshold is not None and (isinstance(threshold, bool) or not -1 <= threshold <= 1):
        raise ValueError(f"a replication threshold is a similarity in [-1, 1], got {threshold!r}")
    if sscd is None:
        if metric not in (None, PIXEL_CORRELATION.name):
            raise ValueError(f"the {metric} metric needs its file (sscd)")
        return PIXEL_CORRELATION if threshold is None else replace(PIXEL_CORRELATION, threshold=float(threshold))
    if metric not in (None, "SSCD"):
        raise ValueError(f"an SSCD file was given for the {metric} metric")
    model = SSCD(sscd, device)
    return ReplicationMetric("SSCD", SSCD_THRESHOLD if threshold is None else float(threshold), model, str(model.path))


def memorization_rate(results: Sequence[ReplicationResult], min_share: float = 0.5) -> float:
    """Memorization rate of a prompt set: the fraction of prompts whose share of replicating seeds is >= `min_share`.

    One `ReplicationResult` per prompt (its seeds' generations). "Any of n
    seeds replicates" is `min_share = 1 / n`.
    """
    if not results:
        raise ValueError("no replication results given")
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    return sum(result.rate >= min_share for result in results) / len(results)


def roc_auc(scores_pos: Sequence[float] | torch.Tensor, scores_neg: Sequence[float] | torch.Tensor) -> float:
    """Area under the ROC curve = Mann–Whitney U / (n_pos · n_neg); ties count one half.

    Compares all pairs, so memory is n_pos · n_neg.
    """
    pos = torch.as_tensor(scores_pos, dtype=torch.float64).flatten()
    neg = torch.as_tensor(scores_neg, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("roc_auc needs at least one positive and one negative score")
    if pos.isnan().any() or neg.isnan().any():
        raise ValueError("roc_auc got NaN scores")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()
