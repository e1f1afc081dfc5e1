"""Localizers: find the units behind a memorized prompt, as an `analysis.masks.Mask`.

* `nemo.NeMo`: output neurons of cross-attention value projections (Hintersdorf et al. 2024).
* `wanda.Wanda`: single feed-forward weights by Wanda importance (Chavhan et al. 2024).
* `saved`: their masks of a model's memorized images, kept on disk per set of weights.

Both follow one contract (`Localizer`), in the scikit-learn style: every
setting, the reference prompts included, is an argument of `__init__`;
`fit(handle, prompt, seeds, callback)` does the work and returns the
estimator; what it found is in attributes ending in `_`, the mask in `mask_`.
Both keep what depends only on the model and the reference prompts
(activation statistics, thresholds) in a disk cache, through `cached`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from analysis.masks import Mask
from analysis.model import ModelHandle
from analysis.paths import RUNS_DIR, SHIPPED_CACHE_DIR
from analysis.progress import Callback

DEFAULT_CACHE_DIR = RUNS_DIR / "localize_cache"
# How many of a model's own reference prompts (its held-out list, or SD v1.4's 500 LAION prompts) the statistics
# computed once per model run over by default: the Wen band of the detectors and Wanda's reference norms. A list
# given as the `reference_prompts` parameter is used in full.
REFERENCE_SAMPLE = 100
ONCE_PER_MODEL = "computed once per model and cached"  # what a first run's progress says of such statistics


def reference_sample(handle: ModelHandle) -> list[str]:
    """The first `REFERENCE_SAMPLE` of the model's reference prompts (its own order: a list fixed per model)."""
    return list(handle.held_out_prompts[:REFERENCE_SAMPLE])


class Localizer(Protocol):
    """What NeMo and Wanda share: settings in `__init__`, `fit` returns the estimator, the mask in `mask_`."""

    reference_prompts: Sequence[str] | None  # non-memorized prompts to contrast with (None: the handle's held-out)
    mask_: Mask  # set by fit

    def fit(self, handle: ModelHandle, prompt: str | torch.Tensor, seeds: Sequence[int] = ...,
            callback: Callback | None = None) -> Localizer: ...


def weights_checksum(parameters: Iterable[torch.Tensor]) -> list[float]:
    """Sum and sum of squares of the parameters: cheap, and changes when the weights do (e.g. after fine-tuning).

    Rounded to 12 significant digits: the order of a sum's additions differs between CPUs (vector widths), and a
    key must not, for the shipped caches to be found.
    """
    with torch.no_grad():
        sums = [(p.double().sum().item(), p.double().square().sum().item()) for p in parameters]
    return [float(f"{total:.12g}") for total in (sum(s for s, _ in sums), sum(q for _, q in sums))]


def cache_key(*parts) -> str:
    """A short hash of JSON-serialisable `parts` (model name, checksums, layer names, prompts, seeds, ...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached(cache_dir: str | Path | None, name: str, key: str,
           compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`compute()`'s tensors, read from `{cache_dir}/{name}-{key}.safetensors` or from the same file among the bundled
    model's shipped caches (`SHIPPED_CACHE_DIR`) when present, else computed and written to `cache_dir`.

    `cache_dir=None` disables the cache.
    """
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{name}-{key}.safetensors"
    for found in (path, SHIPPED_CACHE_DIR / path.name):
        if found.is_file():
            return load_file(str(found))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
    return tensors


def localizer_target(prompt: str | torch.Tensor) -> tuple[list[str] | torch.Tensor, str]:
    """A localizer's target, a prompt or an embedding `[77, d]` (e.g. a Dori trigger), as `sample` takes it,
    and the label its Mask records as `prompt`."""
    if isinstance(prompt, str):
        return [prompt], prompt
    if prompt.ndim != 2:
        raise ValueError(f"an embedding to localize has shape [tokens, d], got {tuple(prompt.shape)}")
    return prompt[None], "<embedding>"
