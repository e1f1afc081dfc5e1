"""Activation discrepancy: do embeddings that replicate one image take the same path through the UNet?

docs/methods.md §7.

For a set of embeddings, every one is run through the UNet at the same noise
and timestep: the first denoising step of `sample` from one seed (x_T, the
schedule's first timestep), text branch only, where Wen's and NeMo's
memorization signals are read too. Each analysed layer's output for that one
call is kept (nothing from later steps), flattened per embedding, and the
mean pairwise L2 distance between embeddings is reported per layer, with the
mean output norm beside it so that layers of different width and scale can
be compared (`relative`). The paper compares this figure for triggers of one
image with the figure for different memorized prompts: if triggers of one
image were as far apart in activation space as different prompts, there is
no common path a mitigation could cut.

Value projections (`to_v`) act on the text alone, so their outputs do not
depend on the noise; feed-forward layers act on the image tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.hooks import hooked, resolve_layers
from analysis.model import ModelHandle
from analysis.sampling import denoising_steps


class FlatOutput:
    """Forward hook keeping every call's output flattened per row, `[rows, features]` float32 on the CPU."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.calls.append(output.detach().float().flatten(1).cpu())

    def rows(self) -> torch.Tensor:
        return torch.cat(self.calls)


def first_step_outputs(handle: ModelHandle, embeddings: torch.Tensor, layers: str | Sequence[str] = "value",
                       seed: int = 0, steps: int | None = None,
                       batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Each layer's output for every embedding `[n, 77, d]` at the first denoising step from `seed`: name -> `[n, F]`.

    `layers`: a hook point kind ("value", "ff") or names. `steps`: the DDIM
    schedule whose first timestep is used (None: the model's default).
    Memory: n × F floats per layer, one UNet call's worth.
    """
    recorders = {name: FlatOutput() for name in resolve_layers(handle.unet, layers)}

    with hooked(handle.unet, forward_hooks=recorders):
        next(denoising_steps(handle, embeddings, [seed], steps=steps or handle.default_steps, guidance=1.0,
                             batch_size=batch_size))
    return {name: recorder.rows() for name, recorder in recorders.items()}


@dataclass
class Discrepancy:
    """Per layer, how far apart the activations of a set of embeddings are. Tensors are `[len(layers)]`."""

    layers: list[str]
    mean_distance: torch.Tensor  # mean L2 distance over every pair of embeddings
    mean_norm: torch.Tensor  # mean L2 norm of one embedding's activation

    @property
    def relative(self) -> torch.Tensor:
        """mean_distance / mean_norm: 0 when all agree, about √2 for unrelated activations of equal size."""
        return self.mean_distance / self.mean_norm.clamp_min(1e-12)

    def as_dict(self) -> dict:
        return {name: dict(mean_distance=d, mean_norm=n, relative=r) for name, d, n, r in zip(
            self.layers, self.mean_distance.tolist(), self.mean_norm.tolist(), self.relative.tolist())}


def discrepancy(activations: Mapping[str, torch.Tensor]) -> Discrepancy:
    """Mean pairwise L2 distance and mean norm per layer of activations name -> `[n, ...]` (one row per embedding)."""
    distances, norms = [], []
    for name, rows in activations.items():
        rows = rows.double().flatten(1)
        if len(rows) < 2:
            raise ValueError(f"{name}: pairwise distances need at least 2 embeddings, got {len(rows)}")
        distances.append(torch.pdist(rows).mean())
        norms.append(rows.norm(dim=1).mean())
    return Discrepancy(list(activations), torch.stack(distances).float(), torch.stack(norms).float())


def activation_discrepancy(handle: ModelHandle, embeddings: torch.Tensor, layers: str | Sequence[str] = "value",
                           seed: int = 0, steps: int | None = None, batch_size: int | None = None) -> Discrepancy:
    """`discrepancy` of the `first_step_outputs` of embeddings `[n, 77, d]`."""
    return discrepancy(first_step_outputs(handle, embeddings, layers, seed, steps, batch_size))
