"""Named hook points in a UNet and one context manager to read or edit them.

Hook points are the `nn.Linear` layers of the UNet's transformer blocks,
named from the module structure so that the same architecture always gives
the same names:

    {part}.{block}.attn.{attention}[.block.{transformer_block}].{layer}
    mid.attn.{attention}[.block.{transformer_block}].{layer}

with `part` one of down/up, and `layer` one of

    to_v    attn2.to_v, the cross-attention value projection (kind "value")
    to_q    attn2.to_q, the cross-attention query projection (kind "query_key")
    to_k    attn2.to_k, the cross-attention key projection (kind "query_key")
    ff.in   ff.net[0].proj, the feed-forward input projection (kind "ff")
    ff.out  ff.net[2], the feed-forward output projection (kind "ff")

e.g. `down.1.attn.0.to_v` is `down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v`.
The `.block.{i}` part appears only where a Transformer2DModel holds several
transformer blocks (SD v1.x and the demo model hold one).

`hooked(unet, forward_hooks=..., weight_masks=...)` attaches forward hooks
and multiplies weights by keep-masks for the duration of a `with` block and
undoes both on exit, also when the block raises. Recording and editing are
both forward hooks: `MeanAbsOutput` and `InputSquaredNorm` reduce activations
as they pass (nothing of full size is kept across calls), `zero_outputs`
blocks output neurons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel
from torch import nn

ForwardHook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]

PARTS = ("down", "mid", "up")
KINDS = ("value", "ff")
# Read by attention capture (analysis.attention), not offered where a layer kind is chosen for localizing.
QUERY_KEY = "query_key"
# NeMo's layer set (Hintersdorf et al. 2024): value projections of the down and mid blocks.
NEMO_PARTS = ("down", "mid")


def _layers_of(transformer_block: nn.Module, kind: str) -> dict[str, nn.Linear]:
    """The layers of one diffusers BasicTransformerBlock that belong to `kind`, by their name suffix."""
    if kind == "value":
        cross_attention = transformer_block.attn2
        return {} if cross_attention is None else {"to_v": cross_attention.to_v}
    if kind == QUERY_KEY:
        cross_attention = transformer_block.attn2
        return {} if cross_attention is None else {"to_q": cross_attention.to_q, "to_k": cross_attention.to_k}
    if kind == "ff":
        return {"ff.in": transformer_block.ff.net[0].proj, "ff.out": transformer_block.ff.net[2]}
    raise ValueError(f"unknown hook point kind {kind!r}; choose one of {(*KINDS, QUERY_KEY)}")


def _attention_modules(unet: UNet2DConditionModel, parts: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name prefix, Transformer2DModel) for every cross-attention transformer of the chosen parts, in forward order."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown UNet parts {sorted(unknown)}; choose from {PARTS}")
    blocks = []
    if "down" in parts:
        blocks += [(f"down.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if "mid" in parts and unet.mid_block is not None:
        blocks.append(("mid", unet.mid_block))
    if "up" in parts:
        blocks += [(f"up.{i}", block) for i, block in enumerate(unet.up_blocks)]
    for block_name, block in blocks:
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            # Plain self-attention mid blocks (UNetMidBlock2D) hold Attention modules, not transformers.
            if hasattr(attention, "transformer_blocks"):
                yield f"{block_name}.attn.{j}", attention


def _transformer_blocks(unet: UNet2DConditionModel, parts: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name prefix, BasicTransformerBlock) of every cross-attention transformer block of the chosen parts."""
    for prefix, attention in _attention_modules(unet, parts):
        transformer_blocks = attention.transformer_blocks
        for b, transformer_block in enumerate(transformer_blocks):
            yield (prefix if len(transformer_blocks) == 1 else f"{prefix}.block.{b}"), transformer_block


def hook_points(unet: UNet2DConditionModel, kind: str = "value", parts: Sequence[str] = PARTS) -> dict[str, nn.Linear]:
    """Named linear layers of one `kind` ("value", "ff" or "query_key") in the chosen UNet `parts`, in forward order."""
    points: dict[str, nn.Linear] = {}
    for block_prefix, transformer_block in _transformer_blocks(unet, parts):
        for suffix, layer in _layers_of(transformer_block, kind).items():
            points[f"{block_prefix}.{suffix}"] = layer
    return points


def cross_attention_layers(unet: UNet2DConditionModel, parts: Sequence[str] = PARTS) -> dict[str, nn.Module]:
    """The cross-attention modules (`attn2`) of the chosen parts by their hook point prefix, e.g. `down.1.attn.0`
    (the name of its `to_v` without `.to_v`), in forward order."""
    return {prefix: block.attn2 for prefix, block in _transformer_blocks(unet, parts) if block.attn2 is not None}


def nemo_layers(unet: UNet2DConditionModel) -> dict[str, nn.Linear]:
    """NeMo's default layer set: the cross-attention value projections of the down and mid blocks."""
    return hook_points(unet, "value", NEMO_PARTS)


def resolve_layers(unet: UNet2DConditionModel, layers: str | Sequence[str]) -> dict[str, nn.Linear]:
    """A kind ("value", "ff": every such layer of the UNet) or a list of hook point names -> named layers."""
    if isinstance(layers, str):
        return hook_points(unet, layers)
    every = {name: layer for kind in (*KINDS, QUERY_KEY) for name, layer in hook_points(unet, kind).items()}
    missing = [name for name in layers if name not in every]
    if missing:
        raise KeyError(f"no hook points named {missing} in this UNet; it has {list(every)}")
    return {name: every[name] for name in layers}


@contextmanager
def hooked(unet: UNet2DConditionModel, forward_hooks: Mapping[str, ForwardHook] | None = None,
           weight_masks: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Attach forward hooks and weight keep-masks to named hook points for the duration of the block.

    `forward_hooks`: name -> `hook(module, inputs, output)`; a returned tensor
    replaces the output. `weight_masks`: name -> bool `[out, in]`, True where
    the weight stays; the others are set to 0 in place and every original
    weight is written back on exit. Hooks are removed and weights restored
    also when the block raises.
    """
    forward_hooks = forward_hooks or {}
    weight_masks = weight_masks or {}
    layers = resolve_layers(unet, [*forward_hooks, *weight_masks])
    handles = []
    originals: dict[str, torch.Tensor] = {}
    try:
        for name, hook in forward_hooks.items():
            handles.append(layers[name].register_forward_hook(hook))
        for name, keep in weight_masks.items():
            weight = layers[name].weight
            if keep.shape != weight.shape:
                raise ValueError(f"weight mask for {name} has shape {tuple(keep.shape)}, the weight {tuple(weight.shape)}")
            originals[name] = weight.detach().clone()
            with torch.no_grad():
                weight.mul_(keep.to(weight.device, weight.dtype))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, original in originals.items():
                layers[name].weight.copy_(original)


def zero_outputs(removed: torch.Tensor) -> ForwardHook:
    """A forward hook that sets the output channels where `removed` (bool `[out]`) is True to exactly 0."""
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.masked_fill(removed.to(output.device), 0.0)
    return hook


class MeanAbsOutput:
    """Forward hook recording, per call, the mean |output| over tokens of each row and channel: `[rows, out]`.

    For a value projection this is NeMo's activation a_i = mean over tokens |(W_v y)_i|.
    """

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.calls.append(output.detach().abs().mean(dim=1).float().cpu())

    def rows(self) -> torch.Tensor:
        """Every recorded row, in call order: `[rows, out]`."""
        return torch.cat(self.calls)


class InputSquaredNorm:
    """Forward hook accumulating ‖X_j‖₂² per input channel j over every token of every call (Wanda's statistic)."""

    def __init__(self):
        self.sum_of_squares: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().float()
        x = x.reshape(-1, x.shape[-1])
        squares = x.pow(2).sum(dim=0).cpu()
        self.sum_of_squares = squares if self.sum_of_squares is None else self.sum_of_squares + squares
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input channel, `[in]`."""
        if self.sum_of_squares is None:
            raise RuntimeError("no activations were recorded: the layer was never called inside the hooked block")
        return self.sum_of_squares.sqrt()
