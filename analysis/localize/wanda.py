"""Wanda-style pruning of the weights a memorized prompt relies on (Chavhan et al. 2024).

docs/methods.md §5. Wanda (Sun et al. 2023) scores weight W_ij of a linear
layer by |W_ij| · ‖X_j‖₂, X_j being input channel j over every token the layer
saw on calibration data. The memorization variant scores the weights twice,
on the memorized prompt and on non-memorized reference prompts, and prunes the
weights in the top share for the memorized prompt but not for the references.

The authors' code is unreleased; the choices made here:

* Layers: both linear layers of every transformer feed-forward block
  (`ff.in`, `ff.out`; hook point kind "ff") in the down, mid and up blocks.
  A kind or a list of hook point names can be passed instead.
* Activations X: the inputs of those layers over the first `record_steps`
  denoising steps of the project's sampling loop from the given
  seeds, text branch only (guidance 1): the unconditional branch is the same
  empty prompt for both sets and would only dilute the contrast.
* ‖X_j‖₂ over all tokens (pixels) of all rows and recorded steps; the
  references' norms are pooled over all reference prompts and cached.
* Top share per output row, Wanda's comparison group (Sun et al. found it
  better than per layer), at least one weight per row so that 1 % of a narrow
  layer is not zero weights.
* Importance X of one memorized prompt against pooled reference prompts: a
  per-prompt mask (as NeMo's), where Chavhan et al. contrast a set of
  memorized prompts; the set can be one prompt.

How these masks do on the bundled demo model: docs/results/mitigation.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from analysis.hooks import InputSquaredNorm, hooked, resolve_layers
from analysis.localize import (DEFAULT_CACHE_DIR, ONCE_PER_MODEL, cache_key, cached, localizer_target,
                               reference_sample, weights_checksum)
from analysis.masks import Mask
from analysis.model import ModelHandle
from analysis.progress import Callback, report
from analysis.sampling import denoising_steps

DEFAULT_SEEDS = tuple(range(4))


def input_norms(handle: ModelHandle, layers: dict[str, nn.Linear], prompts: Sequence[str] | torch.Tensor,
                seeds: Sequence[int], steps: int, record_steps: int, batch_size: int | None = None,
                callback: Callback | None = None, what: str = "activations") -> dict[str, torch.Tensor]:
    """‖X_j‖₂ per input channel `[in]` of each layer, over the first `record_steps` steps of sampling `prompts` × `seeds`.

    Text branch only (guidance 1); every step when the schedule has fewer.
    `callback` receives a `TaskProgress` per step recorded, out of the steps recorded, with `what` as its message.
    """
    if record_steps < 1:
        raise ValueError(f"record_steps must be at least 1, got {record_steps}")
    recorders = {name: InputSquaredNorm() for name in layers}
    recorded = min(record_steps, steps)
    with hooked(handle.unet, forward_hooks=recorders):
        for step in denoising_steps(handle, prompts, seeds, steps, guidance=1.0, batch_size=batch_size):
            report(callback, "Wanda", step.index + 1, recorded, what, unit="steps")
            if step.index + 1 == record_steps:
                break
    return {name: recorder.norms() for name, recorder in recorders.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, `[out, in]`."""
    return weight.detach().abs().float().cpu() * norms[None, :]


def top_share_per_row(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Bool `[out, in]`, True at the `share` highest scores of each row (at least one per row)."""
    k = max(1, round(share * scores.shape[1]))
    top = torch.zeros_like(scores, dtype=torch.bool)
    return top.scatter_(1, scores.topk(k, dim=1).indices, True)


class Wanda:
    """Find the feed-forward weights important for a memorized prompt but not for normal prompts.

    `wanda = Wanda(reference_prompts=[...]).fit(handle, prompt)`; then
    `with wanda.mask_.applied(handle): sample(...)`.

    Parameters: `reference_prompts`, non-memorized prompts (None: the
    handle's held-out prompts); `sparsity`, the top share of each output row
    compared (the literature uses about 1 %); `layers`, a hook point kind or
    names; `record_steps` of a `steps`-step schedule (None: the model's
    default); `cache_dir` for the reference norms (None: no cache);
    `batch_size` caps UNet rows per call.

    After `fit`: `mask_` (the pruned weights), `prompt_norms_` and
    `reference_norms_` (‖X_j‖₂ per layer for the prompt and the pooled
    reference prompts).
    """

    def __init__(self, reference_prompts: Sequence[str] | None = None, sparsity: float = 0.01,
                 layers: str | Sequence[str] = "ff", record_steps: int = 5, steps: int | None = None,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, batch_size: int | None = None):
        self.reference_prompts = reference_prompts
        self.sparsity = sparsity
        self.layers = layers
        self.record_steps = record_steps
        self.steps = steps
        self.cache_dir = cache_dir
        self.batch_size = batch_size

    def fit(self, handle: ModelHandle, prompt: str | torch.Tensor, seeds: Sequence[int] = DEFAULT_SEEDS,
            callback: Callback | None = None) -> Wanda:
        """Localize `prompt` (a prompt or an embedding `[77, d]`, e.g. a Dori trigger); returns this estimator.

        `callback` receives a `TaskProgress` per recorded step and may raise
        `SamplingCancelled` to stop.
        """
        conditioning, label = localizer_target(prompt)
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        seeds = [int(seed) for seed in seeds]
        steps = self.steps or handle.default_steps
        reference_prompts = list(self.reference_prompts or reference_sample(handle))
        if not reference_prompts:
            raise ValueError("Wanda needs non-memorized reference prompts: pass reference_prompts")
        layers = resolve_layers(handle.unet, self.layers)

        def norms_of(prompts: list[str] | torch.Tensor, what: str) -> dict[str, torch.Tensor]:
            return input_norms(handle, layers, prompts, seeds, steps, self.record_steps, self.batch_size, callback,
                               what)

        self.prompt_norms_ = norms_of(conditioning, "activations of the prompt")
        key = cache_key(handle.name, weights_checksum(handle.unet.parameters()), list(layers), reference_prompts,
                        seeds, steps, self.record_steps)
        what = f"norms of {len(reference_prompts)} reference prompts × {len(seeds)} seeds ({ONCE_PER_MODEL})"
        self.reference_norms_ = cached(self.cache_dir, "wanda-norms", key, lambda: norms_of(reference_prompts, what))

        removed = {}
        for name, layer in layers.items():
            important_for_prompt = top_share_per_row(wanda_scores(layer.weight, self.prompt_norms_[name]),
                                                     self.sparsity)
            important_for_references = top_share_per_row(wanda_scores(layer.weight, self.reference_norms_[name]),
                                                         self.sparsity)
            removed[name] = important_for_prompt & ~important_for_references
        parameters = dict(sparsity=self.sparsity, seeds=seeds, steps=steps, record_steps=self.record_steps,
                          reference_prompts=len(reference_prompts))
        self.mask_ = Mask(removed, method="wanda", prompt=label, model=handle.name, parameters=parameters)
        return self
