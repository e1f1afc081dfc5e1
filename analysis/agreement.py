"""Mask agreement: do localizers find the same units for different triggers of one image? (docs/methods.md §7)

`localize_each` fits a localizer (NeMo, Wanda: any `analysis.localize.Localizer`)
once per embedding;
`iou_matrix` compares masks pairwise per layer with `analysis.masks.iou`.
A layer where both masks remove nothing has no IoU: it is NaN in `values`
and True in `undefined`, never 1. Between methods (NeMo removes neurons,
Wanda single weights) compare with `level="neurons"`: a weight mask counts
an output neuron as touched when any of its weights is removed, so both
masks need the same layers (e.g. `Wanda(layers="value")` beside NeMo).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analysis.localize import Localizer
from analysis.masks import Mask, iou
from analysis.model import ModelHandle
from analysis.progress import Callback, report

LEVELS = ("units", "neurons")


STAGE = "localizer fits"  # the stage of the `TaskProgress` that counts fits, beside each fit's own events


def localize_each(localizer: Localizer, handle: ModelHandle, embeddings: torch.Tensor, callback: Callback | None = None,
                  done: int = 0, total: int | None = None, **fit_arguments) -> list[Mask]:
    """One mask per embedding of `[n, 77, d]`: `localizer.fit(handle, embedding, callback=callback,
    **fit_arguments).mask_`.

    Before each fit `callback` also receives `TaskProgress(STAGE, done + i, total)` (`total`: n unless given), so
    that a caller fitting several localizers can show one count over all of them.
    """
    masks = []
    for i, embedding in enumerate(embeddings):
        report(callback, STAGE, done + i, total or len(embeddings),
               f"{type(localizer).__name__} on trigger {i + 1} of {len(embeddings)}")
        masks.append(localizer.fit(handle, embedding, callback=callback, **fit_arguments).mask_)
    report(callback, STAGE, done + len(embeddings), total or len(embeddings))
    return masks


def as_neurons(mask: Mask) -> Mask:
    """The mask at neuron level: a weight mask `[out, in]` becomes `[out]`, True where a row lost any weight."""
    removed = {name: units.any(dim=1) if units.ndim == 2 else units for name, units in mask.removed.items()}
    return Mask(removed, mask.method, mask.prompt, mask.model, mask.parameters)


@dataclass
class IoUMatrix:
    """Pairwise IoU of two lists of masks per layer: entry [l, i, j] compares row mask i with column mask j."""

    layers: list[str]
    values: torch.Tensor  # [layers, rows, columns] float32; NaN where undefined
    undefined: torch.Tensor  # [layers, rows, columns] bool; True where neither mask removes anything in the layer
    symmetric: bool  # rows and columns are the same masks (the diagonal is 1 or undefined and says nothing)

    def layer_means(self) -> dict[str, float | None]:
        """Mean IoU over the defined pairs of each layer (off the diagonal when symmetric); None if there are none."""
        pairs = ~self.undefined
        if self.symmetric:
            pairs &= ~torch.eye(self.values.shape[1], dtype=torch.bool)
        means = {}
        for layer, values, chosen in zip(self.layers, self.values, pairs):
            means[layer] = values[chosen].mean().item() if chosen.any() else None
        return means

    def undefined_shares(self) -> dict[str, float]:
        """Share of pairs per layer where both masks are empty (off the diagonal when symmetric)."""
        pairs = torch.ones(self.values.shape[1:], dtype=torch.bool)
        if self.symmetric:
            pairs &= ~torch.eye(self.values.shape[1], dtype=torch.bool)
        return {layer: undefined[pairs].float().mean().item() for layer, undefined in zip(self.layers, self.undefined)}


def iou_matrix(rows: Sequence[Mask], columns: Sequence[Mask] | None = None, level: str = "units") -> IoUMatrix:
    """IoU per layer between every mask of `rows` and every mask of `columns` (None: `rows` with themselves).

    `level`: "units" compares what each mask removes (neurons or weights);
    "neurons" first reduces weight masks to neurons (`as_neurons`). Layers:
    every layer of any mask, in first-seen order; a layer a mask lacks counts
    as nothing removed there.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    if not rows or (columns is not None and not columns):
        raise ValueError("iou_matrix needs at least one mask on each side")
    symmetric = columns is None
    columns = rows if columns is None else columns
    if level == "neurons":
        rows, columns = [as_neurons(mask) for mask in rows], [as_neurons(mask) for mask in columns]
    layers = list(dict.fromkeys(name for mask in [*rows, *columns] for name in mask.removed))
    values = torch.full((len(layers), len(rows), len(columns)), float("nan"))
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            for name, value in iou(row, column).items():
                if value is not None:
                    values[layers.index(name), i, j] = value
    return IoUMatrix(layers, values, values.isnan(), symmetric)
