"""A rehearsal at Stable Diffusion v1.4's full size on the CPU: does every analysis run, how long, how much memory?

    python -m analysis.bench.sd14_rehearsal [--device cpu] [--out docs/results/sd14_cpu_rehearsal.md]

It builds a pipeline of SD v1.4's architecture with random weights from the
published configurations (no download; the tokenizer is the bundled model's,
with SD's 77 positions), saves it as float16 safetensors in a temporary folder
(never committed), then loads it as a researcher's folder is loaded: through
`load_model` and through `python app.py --model FOLDER`. On the loaded model it
runs one short step of each analysis through `run_task`, at 512 px: one seed
of 2 denoising steps, one Dori step, NeMo's reference statistics on 2 prompts,
Wanda on 2 reference prompts, gradient-norm attribution with 1 seed. Each row
gives the wall time and the process's peak resident memory so far.

With random weights the images mean nothing: the costs are what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from analysis.bench import SD14_UNET_CONFIG, app_process, write_report
from analysis.hooks import nemo_layers
from analysis.localize.nemo import reference_statistics
from analysis.model import DEMO_MODEL_DIR, ModelHandle, load_model
from analysis.tasks import run_task

# text_encoder/config.json, vae/config.json and scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4.
SD14_TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                projection_dim=768)
SD14_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                       block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD14_PNDM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
PROMPTS = ["a photograph of an astronaut riding a horse", "an oil painting of a lighthouse at dusk"]
STEPS = 2


def peak_memory_gib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 2**20


def build_folder(folder: Path, seed: int = 0, unet_config: dict = SD14_UNET_CONFIG,
                 text_encoder_config: dict = SD14_TEXT_ENCODER_CONFIG, vae_config: dict = SD14_VAE_CONFIG) -> None:
    """A random-weight SD v1.4 pipeline saved as float16 safetensors, as `save_pretrained` writes a real one.

    The tests pass narrower configurations of the same structure."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(DEMO_MODEL_DIR), subfolder="tokenizer")
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config), text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder_config)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**unet_config), scheduler=PNDMScheduler(**SD14_PNDM_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def app_ready_seconds(folder: Path, log: Path) -> float:
    """`python app.py --model FOLDER` to its first HTTP 200, and the peak memory of that process."""
    started = time.perf_counter()
    with log.open("w") as output, app_process(output, extra_args=["--model", str(folder)]):
        return time.perf_counter() - started


def analyses(handle: ModelHandle, size: int = 512) -> dict[str, Callable[[], object]]:
    """One short run of each analysis on `handle` (images of `size` px), as `run_task` (the app's and the CLI's
    path) runs it."""
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompt = PROMPTS[0]
    return {
        f"replicate: 1 seed, {STEPS} steps, guidance {handle.default_guidance:g}, decoded to 512 px":
            lambda: run_task(handle, "replicate", dict(prompt=prompt, seeds=[0], steps=STEPS)),
        f"Dori attack: 1 search step (batch 1), then 1 seed of {STEPS} steps before and after":
            lambda: run_task(handle, "attack", dict(prompt=prompt, search=dict(steps=1, batch_size=1),
                                                    evaluation_seeds=[0], steps=STEPS), inputs={"target": image}),
        "NeMo: reference statistics of the value layers on 2 prompts (one UNet pass each)":
            lambda: reference_statistics(handle, nemo_layers(handle.unet), PROMPTS, cache_dir=None),
        f"Wanda: 1 % of the feed-forward weights, 1 recorded step, 2 reference prompts, before/after {STEPS} steps":
            lambda: run_task(handle, "localize", dict(
                prompt=prompt, method="wanda", seeds=[0], evaluation_seeds=[0],
                parameters=dict(record_steps=1, steps=STEPS, reference_prompts=PROMPTS[1:]))),
        "attribution: gradient norm, 1 seed":
            lambda: run_task(handle, "attribute", dict(prompt=prompt, method="gradient_norm",
                                                       parameters=dict(seeds=[0]))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/results/sd14_cpu_rehearsal.md"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, str, str]] = []

    def measured(label: str, run) -> object:
        started = time.perf_counter()
        result = run()
        rows.append((label, f"{time.perf_counter() - started:.1f} s", f"{peak_memory_gib():.2f} GiB"))
        print(f"{label}: {rows[-1][1]}, peak {rows[-1][2]}", flush=True)
        return result

    with tempfile.TemporaryDirectory(prefix="sd14-rehearsal-") as temporary:
        folder = Path(temporary) / "sd14-random"
        measured("build SD v1.4's architecture (random weights) and save it as float16 safetensors",
                 lambda: build_folder(folder))
        size_gib = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**30
        handle = measured(f"`load_model` of the folder ({size_gib:.2f} GiB on disk) in float32 on {args.device}",
                          lambda: load_model(folder, device=args.device, dtype="float32"))
        ready = app_ready_seconds(folder, Path(temporary) / "app.log")
        rows.append(("`python app.py --model FOLDER` to its first HTTP 200 (a separate process)", f"{ready:.1f} s",
                     f"{peak_memory_gib(resource.RUSAGE_CHILDREN):.2f} GiB (that process)"))
        # Every analysis samples with the folder's scheduler at the rehearsal's step count.
        handle = dataclasses.replace(handle, default_steps=STEPS)
        for label, run in analyses(handle).items():
            measured(label, run)
    rows.append(("one adversarial fine-tuning step", "not run",
                 "does not fit this 24 GiB machine: the UNet's float32 weights, gradients and Adam's two moments "
                 "take 4 × 3.2 GiB, beside the loaded model (5.8 GiB), the frozen copy the normal term distils from "
                 "(3.2 GiB) and the activations"))
    write_report(args.out, "Stable Diffusion v1.4 at full size on the CPU: a rehearsal",
                 f"python -m analysis.bench.sd14_rehearsal --device {args.device}",
                 "Random weights in SD v1.4's architecture (UNet 860 M, text encoder 123 M, VAE 84 M parameters), "
                 "float16 safetensors on disk, float32 in memory on the CPU. Times are one run each (wall clock); "
                 "memory is the process's peak resident set so far, read after each step.",
                 rows, "", load_before, os.getloadavg()[0], headers=("step", "wall time", "peak memory"))


if __name__ == "__main__":
    main()
