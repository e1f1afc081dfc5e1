"""A tiny, randomly initialised Stable Diffusion-shaped model (no download), and the captions it knows.

A plain module rather than part of conftest.py, so tests can import it by name:
tests/browser has a conftest.py of its own, and `from conftest import` would reach either.
"""

from __future__ import annotations

import os

# Tests never touch the network: without this a hub id retries for minutes before failing.
# Set before diffusers/transformers are imported, since huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from analysis.demo.architecture import MAX_LENGTH, build_scheduler, build_tokenizer  # noqa: E402
from analysis.demo.data import all_shape_specs, render_shapes  # noqa: E402
from analysis.memorized import MemorizedImage  # noqa: E402
from analysis.model import ModelHandle, PassThroughCodec  # noqa: E402

TINY_SIZE = 16
TINY_WIDTH = 32

MEMORIZED_CAPTIONS = ["a photo of the red lighthouse", "the golden retriever on the beach"]
HELD_OUT_PROMPTS = ["a small blue square on a white background", "a green ring on a black background"]
TINY_CAPTIONS = MEMORIZED_CAPTIONS + HELD_OUT_PROMPTS + [
    f"a {size} {color} {shape} on a {background} background"
    for size, color, shape, background in [
        ("small", "red", "circle", "white"), ("large", "blue", "square", "black"),
        ("small", "yellow", "cross", "blue"), ("large", "green", "triangle", "white"),
        ("small", "purple", "ring", "yellow"), ("large", "orange", "circle", "green"),
        ("small", "white", "square", "black"), ("large", "black", "cross", "white"),
        ("small", "blue", "triangle", "yellow"), ("large", "red", "ring", "blue"),
        ("small", "green", "circle", "black"), ("large", "yellow", "square", "green"),
        ("small", "orange", "cross", "white"), ("large", "purple", "triangle", "black"),
        ("small", "red", "square", "yellow"), ("large", "white", "circle", "blue"),
    ]
]


def tiny_text_encoder(tokenizer) -> CLIPTextModel:
    """A two-layer CLIP text encoder of width TINY_WIDTH over `tokenizer`'s vocabulary (seed torch first)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=4 * TINY_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=TINY_WIDTH))


def tiny_unet(channels: int, size: int) -> UNet2DConditionModel:
    """A UNet of SD's block types, one cross-attention level, on `channels` x `size` x `size` (seed torch first)."""
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_WIDTH, norm_num_groups=8, attention_head_dim=4)


def build_tiny_handle(seed: int = 0) -> ModelHandle:
    """A seeded, randomly initialised model with SD's component types, small enough for fast CPU tests."""
    tokenizer = build_tokenizer(TINY_CAPTIONS)
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(tokenizer)
    unet = tiny_unet(3, TINY_SIZE)
    codec = PassThroughCodec(latent_channels=3, sample_size=TINY_SIZE)
    for module in (text_encoder, unet, codec):
        module.eval().requires_grad_(False)
    images = torch.rand(len(MEMORIZED_CAPTIONS), 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(seed))
    return ModelHandle(
        name=f"tiny test model (seed {seed})", tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        codec=codec, scheduler=build_scheduler(),
        device=torch.device("cpu"), dtype=torch.float32,
        memorized=[MemorizedImage(caption, image * 2 - 1) for caption, image in zip(MEMORIZED_CAPTIONS, images)],
        held_out_prompts=list(HELD_OUT_PROMPTS),
        # The held-out captions rendered by the demo data, as the bundled model's controls/ folder holds them.
        controls=[MemorizedImage(spec.caption, render_shapes([spec], torch.Generator().manual_seed(0), TINY_SIZE)[0])
                  for spec in all_shape_specs() if spec.caption in HELD_OUT_PROMPTS],
    )
