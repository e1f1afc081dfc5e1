"""NeMo and Wanda masks of a model's memorized images, kept on disk per set of weights.

The mitigation experiment saves the masks it fits here; the analyses that need
a memorized image's mask read it back instead of fitting again, and fit one
with the localizer's default settings when it is missing. A file's name carries
the UNet's checksum, so that after a model changes (retraining, fine-tuning)
no reader picks up a mask fitted on other weights.
"""

from __future__ import annotations

from pathlib import Path

from analysis.localize import cache_key, weights_checksum
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.masks import Mask
from analysis.model import ModelHandle
from analysis.paths import RUNS_DIR

MASKS_DIR = RUNS_DIR / "mitigation_masks"
LOCALIZER_SEEDS = list(range(4))  # seeds of a mask fitted here, as the mitigation experiment fits its masks


def mask_file(handle: ModelHandle, method: str, index: int) -> Path:
    """Where the mask of `method` ("nemo" or "wanda") for memorized image `index` on these weights is kept."""
    key = cache_key(handle.name, weights_checksum(handle.unet.parameters()))
    return MASKS_DIR / f"{method}-{index}-{key}.safetensors"


def saved_mask(handle: ModelHandle, method: str, index: int, save: bool = False) -> Mask:
    """The kept mask of memorized image `index`; when there is none, one fitted with the localizer's defaults (and
    kept, with `save`)."""
    path = mask_file(handle, method, index)
    if path.is_file():
        return Mask.load(path)
    localizer = NeMo() if method == "nemo" else Wanda()
    mask = localizer.fit(handle, handle.memorized[index].caption, seeds=LOCALIZER_SEEDS).mask_
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        mask.save(path)
    return mask
