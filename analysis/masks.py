"""A mitigation as a mask: which units of which named layers are removed.

One type serves both localizers. Per hook point name (see `analysis.hooks`)
a `Mask` holds a bool tensor, True where a unit is removed:

* `[out]`: output neurons (NeMo). Applied by a forward hook that zeroes those
  channels; baked by zeroing the rows of the weight and the bias.
* `[out, in]`: single weights (Wanda). Applied and baked by setting those weights to 0.

A file is safetensors: one bool tensor per layer, and the metadata (method,
prompt, model name, parameters, layer order) as JSON under the key "mask".

`generate` samples at the model's default settings, under a mask when given.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from analysis.hooks import hooked, resolve_layers, zero_outputs
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, sample

METADATA_KEY = "mask"


@dataclass
class Mask:
    removed: dict[str, torch.Tensor]  # hook point name -> bool [out] (neurons) or [out, in] (weights); True = removed
    method: str  # "nemo", "wanda", ...
    prompt: str  # the prompt it was localized for
    model: str  # the model's name (ModelHandle.name)
    parameters: dict = field(default_factory=dict)  # the localizer's settings; JSON values only

    def __post_init__(self):
        for name, removed in self.removed.items():
            if removed.dtype != torch.bool or removed.ndim not in (1, 2):
                raise ValueError(f"{name}: a mask is bool [out] or [out, in], got {removed.dtype} {tuple(removed.shape)}")

    def counts(self) -> dict[str, int]:
        """Removed neurons (or weights) per layer."""
        return removed_counts(self.removed)

    def save(self, path: str | Path) -> None:
        metadata = dict(method=self.method, prompt=self.prompt, model=self.model, parameters=self.parameters,
                        layers=list(self.removed))
        tensors = {name: removed.contiguous().cpu() for name, removed in self.removed.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        """The mask `save` wrote to `path`; ValueError for any other file."""
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads(file.metadata()[METADATA_KEY])
                removed = {name: file.get_tensor(name) for name in metadata["layers"]}
            return cls(removed, metadata["method"], metadata["prompt"], metadata["model"], metadata["parameters"])
        except Exception as err:  # noqa: BLE001 - safetensors raises its own errors; a foreign file, any key error
            raise ValueError(f"{path} is not a mask file written by Dori Lab (`dori localize --save-mask`): "
                             f"{type(err).__name__}") from err

    @contextmanager
    def applied(self, target: ModelHandle | UNet2DConditionModel) -> Iterator[None]:
        """Generate with the units removed inside the block; the model is unchanged after it, also on exceptions."""
        unet = target.unet if isinstance(target, ModelHandle) else target
        neuron_hooks = {name: zero_outputs(removed) for name, removed in self.removed.items() if removed.ndim == 1}
        weight_masks = {name: ~removed for name, removed in self.removed.items() if removed.ndim == 2}
        with hooked(unet, forward_hooks=neuron_hooks, weight_masks=weight_masks):
            yield

    def baked(self, unet: UNet2DConditionModel) -> UNet2DConditionModel:
        """A copy of `unet` with the removed units' weights set to 0 (blocked neurons: their weight rows and bias)."""
        edited = copy.deepcopy(unet)
        layers = resolve_layers(edited, list(self.removed))
        with torch.no_grad():
            for name, removed in self.removed.items():
                removed = removed.to(layers[name].weight.device)
                layers[name].weight[removed] = 0
                if removed.ndim == 1 and layers[name].bias is not None:
                    layers[name].bias[removed] = 0
        return edited


def removed_counts(removed: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of True entries per layer of a name -> bool tensor dict."""
    return {name: int(units.sum()) for name, units in removed.items()}


def iou(a: Mask, b: Mask) -> dict[str, float | None]:
    """Intersection over union of the removed units, per layer of either mask.

    A layer absent from a mask counts as nothing removed there. Where neither
    mask removes anything the IoU is undefined: None, never 1.
    """
    result: dict[str, float | None] = {}
    for name in dict.fromkeys([*a.removed, *b.removed]):
        first, second = a.removed.get(name), b.removed.get(name)
        first = torch.zeros_like(second) if first is None else first
        second = torch.zeros_like(first) if second is None else second
        if first.shape != second.shape:
            raise ValueError(f"{name}: masks of shape {tuple(first.shape)} and {tuple(second.shape)} cannot be compared")
        union = int((first | second).sum())
        result[name] = None if union == 0 else int((first & second).sum()) / union
    return result


def generate(handle: ModelHandle, prompts: list[str] | torch.Tensor, seeds: Sequence[int], mask: Mask | None = None,
             callback: Callable[[DenoisingStep], None] | None = None) -> torch.Tensor:
    """`sample` at the model's default settings, under `mask` when given: images `[items * seeds, 3, H, W]`."""
    if mask is None:
        return sample(handle, prompts, seeds, steps=handle.default_steps, guidance=handle.default_guidance,
                      callback=callback).images
    with mask.applied(handle):
        return generate(handle, prompts, seeds, callback=callback)
