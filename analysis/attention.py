"""Cross-attention maps, DAAM-style (Tang et al. 2023): where in the image each token is looked at.

`CrossAttentionCapture` reads the cross-attention of chosen layers through
forward hooks on their query and key projections (`analysis.hooks`, kind
"query_key"): softmax(QKᵀ·scale) of the text rows of the batch, averaged over
heads, is reduced as it passes:

* `map_sum` `[rows, tokens, S, S]`: each layer's `[tokens, h, w]` map,
  bilinearly upsampled to the latent size S and summed over layers and the
  chosen steps (no map of a single step is kept unless `keep_step_maps`);
* `token_means` `[steps, rows, tokens]`: each token's attention averaged over
  pixels, heads and layers, at every step (what Ren et al.'s entropy and the
  bright-ending signal read).

`attention_maps` generates one image and returns the maps at the image's size:
`maps[token]` at a pixel is the share of that pixel's attention the token
received, averaged over heads, layers and steps, so the maps of all tokens sum
to 1 at every pixel; `normalised()` scales each token's map to a maximum of 1
(DAAM's per-token normalisation) for display. Every token position is kept:
start, words, end and padding of a prompt, or the positions of an embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from analysis.hooks import ForwardHook, cross_attention_layers, hooked
from analysis.model import ModelHandle
from analysis.sampling import DenoisingStep, SampleResult, sample


class CrossAttentionCapture:
    """Forward hooks that reduce the cross-attention of `layers` (name -> `attn2` module) as the UNet runs.

    `guided`: the UNet batch is [unconditional, text] (classifier-free guidance), so only its second half is read.
    `kept_steps`: the step indices whose maps are summed (None: every step). Call `end_step` after each step.
    """

    def __init__(self, layers: dict[str, nn.Module], latent_size: int, guided: bool,
                 kept_steps: Sequence[int] | None = None, keep_step_maps: bool = False):
        if not layers:
            raise ValueError("no cross-attention layers chosen")
        self.layers = layers
        self.latent_size = latent_size
        self.guided = guided
        self.kept_steps = None if kept_steps is None else set(kept_steps)
        self.keep_step_maps = keep_step_maps
        self.step = 0
        self.map_sum: torch.Tensor | None = None
        self.maps_summed = 0  # layer maps added into map_sum
        self.step_maps: list[torch.Tensor] = []
        self.token_means: list[torch.Tensor] = []
        self._step_map: torch.Tensor | None = None
        self._step_means: torch.Tensor | None = None
        self._step_layers = 0
        self._query: torch.Tensor | None = None

    def hooks(self) -> dict[str, ForwardHook]:
        """The forward hooks for `analysis.hooks.hooked`: the query is kept until the key of the same layer comes."""
        hooks: dict[str, ForwardHook] = {}
        for name, attention in self.layers.items():
            hooks[f"{name}.to_q"] = self._keep_query
            hooks[f"{name}.to_k"] = self._key_hook(attention)
        return hooks

    def _keep_query(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._query = output.detach()

    def _key_hook(self, attention: nn.Module) -> ForwardHook:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._add(attention, self._query, output.detach())
        return hook

    def _add(self, attention: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        if self.guided:
            query, key = query.chunk(2)[1], key.chunk(2)[1]
        rows, pixels, inner = query.shape
        heads = attention.heads
        q = query.float().view(rows, pixels, heads, inner // heads).transpose(1, 2)
        k = key.float().view(rows, key.shape[1], heads, inner // heads).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attention.scale).softmax(dim=-1).mean(dim=1)  # [rows, pixels, tokens]
        means = probs.mean(dim=1)
        self._step_means = means if self._step_means is None else self._step_means + means
        self._step_layers += 1
        if self.kept_steps is not None and self.step not in self.kept_steps:
            return
        side = int(round(pixels ** 0.5))
        if side * side != pixels:
            raise ValueError(f"a cross-attention layer has {pixels} positions: attention maps need square latents")
        layer_map = probs.transpose(1, 2).reshape(rows, -1, side, side)
        if side != self.latent_size:
            # Bilinear weights sum to 1, so each pixel's attention still sums to 1 over the tokens.
            layer_map = F.interpolate(layer_map, size=(self.latent_size, self.latent_size), mode="bilinear",
                                      align_corners=False)
        self._step_map = layer_map if self._step_map is None else self._step_map + layer_map
        self.maps_summed += 1

    def end_step(self, step: DenoisingStep) -> None:
        """Close a denoising step (the `sample` callback calls this)."""
        if self._step_layers != len(self.layers):
            raise RuntimeError(f"{self._step_layers} of {len(self.layers)} cross-attention layers ran in step "
                               f"{step.index}: was the UNet called with the capture's batch layout?")
        self.token_means.append((self._step_means / self._step_layers).cpu())
        if self._step_map is not None:
            self.map_sum = self._step_map if self.map_sum is None else self.map_sum + self._step_map
            if self.keep_step_maps:
                self.step_maps.append((self._step_map / self._step_layers).cpu())
        self._step_map, self._step_means, self._step_layers, self._query = None, None, 0, None
        self.step = step.index + 1

    def shares(self) -> torch.Tensor:
        """The summed maps as shares `[rows, tokens, S, S]`: each pixel's sum over tokens is 1."""
        if self.map_sum is None:
            raise RuntimeError("no attention map was recorded: none of the chosen steps ran")
        return self.map_sum / self.maps_summed


def choose_layers(handle: ModelHandle, names: Sequence[str] | None) -> dict[str, nn.Module]:
    """Cross-attention layers by hook point prefix (e.g. "down.1.attn.0"); None: every one of the UNet."""
    every = cross_attention_layers(handle.unet)
    if names is None:
        return every
    missing = [name for name in names if name not in every]
    if missing or not names:
        raise ValueError(f"no cross-attention layers named {list(missing) or names}; this UNet has {list(every)}")
    return {name: every[name] for name in names}


def capture_attention(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: Sequence[int], steps: int,
                      guidance: float, layers: Sequence[str] | None = None, kept_steps: Sequence[int] | None = None,
                      keep_step_maps: bool = False,
                      callback: Callable[[DenoisingStep], None] | None = None
                      ) -> tuple[SampleResult, CrossAttentionCapture]:
    """`sample` with the cross-attention of `layers` captured; the hooks are gone when it returns or raises."""
    capture = CrossAttentionCapture(choose_layers(handle, layers), handle.unet.config.sample_size,
                                    guided=guidance != 1.0, kept_steps=kept_steps, keep_step_maps=keep_step_maps)

    def on_step(step: DenoisingStep) -> None:
        capture.end_step(step)
        if callback is not None:
            callback(step)

    with hooked(handle.unet, forward_hooks=capture.hooks()):
        result = sample(handle, conditioning, seeds, steps=steps, guidance=guidance, callback=on_step)
    return result, capture


@dataclass
class TokenLabel:
    text: str
    kind: str  # "start", "word", "end", "padding" (a prompt's tokens) or "position" (an embedding's)


def token_labels(handle: ModelHandle, prompt: str | None) -> list[TokenLabel]:
    """Every token position of a prompt, marked start/word/end/padding; for an embedding (None), positions."""
    length = handle.tokenizer.model_max_length
    if prompt is None:
        return [TokenLabel(f"position {i}", "position") for i in range(length)]
    ids = handle.tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    end = end_token_index(handle, prompt)
    texts = handle.tokenizer.convert_ids_to_tokens(ids)
    kinds = ["start" if i == 0 else "word" if i < end else "end" if i == end else "padding" for i in range(length)]
    return [TokenLabel(text, kind) for text, kind in zip(texts, kinds)]


def end_token_index(handle: ModelHandle, prompt: str | None) -> int:
    """The position of a prompt's end token; an embedding has none, and its last position stands in (in SD's
    CLIP the padding after the end token repeats the end token, so a prompt's last position is one too)."""
    length = handle.tokenizer.model_max_length
    if prompt is None:
        return length - 1
    ids = handle.tokenizer(prompt, max_length=length, truncation=True).input_ids
    return len(ids) - 1


@dataclass
class AttentionMaps:
    image: torch.Tensor  # [3, H, W] in [-1, 1], the generated image
    maps: torch.Tensor  # [tokens, H, W]: share of each pixel's attention per token (sums to 1 over tokens)
    tokens: list[TokenLabel]
    token_means: torch.Tensor  # [steps, tokens]: attention per token averaged over pixels, heads and layers
    layers: list[str]
    kept_steps: list[int]
    step_maps: torch.Tensor | None  # [kept steps, tokens, S, S] at the latent size, when asked for

    def normalised(self) -> torch.Tensor:
        """Each token's map divided by its maximum (DAAM's per-token normalisation): `[tokens, H, W]` in [0, 1]."""
        return self.maps / self.maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def attention_maps(handle: ModelHandle, conditioning: str | torch.Tensor, seed: int, steps: int, guidance: float,
                   layers: Sequence[str] | None = None, kept_steps: Sequence[int] | None = None,
                   keep_step_maps: bool = False,
                   callback: Callable[[DenoisingStep], None] | None = None) -> AttentionMaps:
    """The maps of a prompt or an embedding `[77, d]` for one seed (see the module docstring)."""
    if kept_steps is not None and (not kept_steps or any(not 0 <= s < steps for s in kept_steps)):
        raise ValueError(f"the steps whose maps are summed must be step indices from 0 to {steps - 1}, got {kept_steps}")
    prompt = conditioning if isinstance(conditioning, str) else None
    batch = [conditioning] if prompt is not None else conditioning[None]
    result, capture = capture_attention(handle, batch, [seed], steps, guidance, layers, kept_steps, keep_step_maps,
                                        callback)
    size = handle.image_size
    maps = capture.shares()
    if maps.shape[-1] != size:
        maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return AttentionMaps(
        image=result.images[0], maps=maps[0].float().cpu(), tokens=token_labels(handle, prompt),
        token_means=torch.stack(capture.token_means)[:, 0], layers=list(capture.layers),
        kept_steps=list(range(steps)) if kept_steps is None else sorted(kept_steps),
        step_maps=torch.stack(capture.step_maps)[:, 0] if keep_step_maps else None)


def overlay(image: torch.Tensor, heat: torch.Tensor, strength: float = 0.6) -> torch.Tensor:
    """A heat map `[H, W]` in [0, 1] over the image `[3, H, W]` in [-1, 1] (greyed), in a black-red-yellow-white
    scale: `[3, H, W]` in [-1, 1]."""
    grey = ((image.float() + 1) / 2).mean(dim=0, keepdim=True).expand(3, -1, -1)
    heat = heat.float().clamp(0, 1)
    colour = torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)])
    return ((1 - strength) * grey + strength * colour) * 2 - 1
