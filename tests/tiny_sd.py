"""A tiny latent Stable Diffusion pipeline folder as `StableDiffusionPipeline.save_pretrained` writes it, and an
imagefolder memorized set, for end-to-end tests of a real model layout (no download).

The scheduler is SD v1.4's (`PNDMScheduler` with its published settings) or, for the v-prediction folder, SD 2.x's
(`DDIMScheduler` with `prediction_type="v_prediction"`). No `memorized.json` sidecar: the memorized set is given as a
folder of images with a `metadata.csv`, as a user with their own images would.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from PIL import Image

from analysis.demo.architecture import build_tokenizer
from tiny_model import TINY_CAPTIONS, tiny_text_encoder, tiny_unet

LATENT_SIZE = 8
IMAGE_SIZE = 16  # LATENT_SIZE times the VAE's factor of 2
SET_CAPTIONS = ["a photo of the red lighthouse", "the golden retriever on the beach"]
REFERENCE_PROMPTS = ["a small blue square on a white background", "a green ring on a black background",
                     "a large red circle on a white background"]
# SD v1.4's scheduler_config.json, as published.
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)


def build_tiny_sd_folder(folder: Path, v_prediction: bool = False, seed: int = 0) -> Path:
    """Write a seeded, randomly initialised SD pipeline (4-channel latents, a tiny VAE) with `save_pretrained`."""
    tokenizer = build_tokenizer(TINY_CAPTIONS)
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(tokenizer)
    unet = tiny_unet(4, LATENT_SIZE)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)
    if v_prediction:
        scheduler = DDIMScheduler(**{key: value for key, value in SD14_SCHEDULER.items() if key != "skip_prk_steps"},
                                  clip_sample=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**SD14_SCHEDULER)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def write_memorized_set(folder: Path, captions: list[str] = SET_CAPTIONS, seed: int = 0) -> Path:
    """An imagefolder memorized set: images of other sizes and modes than the model's, and `metadata.csv`."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    # A wide RGB photo and a tall greyscale one: both are centre-cropped and resized to the model's size.
    shapes = [((24, 40), "RGB"), ((30, 20), "L")]
    rows = []
    for index, caption in enumerate(captions):
        (height, width), mode = shapes[index % len(shapes)]
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        name = f"image{index}.png"
        Image.fromarray(pixels).convert(mode).save(folder / name)
        rows.append(dict(file_name=name, text=caption, url=f"http://127.0.0.1/{name}"))
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file_name", "text", "url"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_prompt_list(path: Path, prompts: list[str] = REFERENCE_PROMPTS) -> Path:
    """A one-column CSV prompt list (`--reference-prompts`)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["prompt"])
        writer.writerows([prompt] for prompt in prompts)
    return path


class PooledPixels(torch.nn.Module):
    """Stands in for SSCD's network: the descriptor is the image average-pooled to 4x4 (48 numbers), centred, so
    that its cosine similarity is the pooled images' correlation."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)


def write_sscd_standin(path: Path) -> Path:
    """A TorchScript file shaped like SSCD's (images in, descriptors out), written with `torch.jit.script`."""
    torch.jit.script(PooledPixels()).save(str(path))
    return path


def write_metadata_csv(folder: Path, rows: list[list[str]], columns: tuple[str, ...] = ("file_name", "text")) -> None:
    """An imagefolder set's `metadata.csv` with these rows (to craft good and bad sets)."""
    with open(folder / "metadata.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)
