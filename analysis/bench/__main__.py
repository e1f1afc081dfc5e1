"""Every speed target in one run: `python -m analysis.bench [--repeats 5] [--out docs/results/bench_all.md]`.

On the bundled model, on the CPU (the measurements of `analysis.bench.sampling`
and `analysis.bench.dori`, whose `measure` functions run here):

* `sample` vs diffusers' `StableDiffusionPipeline`, ratio of medians (target ≤ 1.05);
* one Dori step vs a bare UNet forward + backward, ratio of medians (target ≤ 1.15).

When CUDA is available, also on an SD v1.4-architecture UNet with random
weights, built from the published configuration (no download), in float16
with PyTorch's scaled-dot-product attention (diffusers' default processor):

* the same Dori-step vs bare-pass ratio;
* a 50-step, batch-8 Dori search end to end (target ≤ 4 s on one H100) and its peak GPU memory.

The search aims at a random latent `[4, 64, 64]` from a random embedding
`[77, 768]`: with random weights, shapes and costs are what the numbers mean.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from analysis.bench import dori as dori_bench
from analysis.bench import sampling as sampling_bench
from analysis.bench import SD14_UNET_CONFIG, verdict, write_report
from analysis.dori import Start
from analysis.model import ModelHandle, PassThroughCodec, load_model
from analysis.sampling import encode_prompts

GPU_SEARCH_SECONDS_TARGET = 4.0
SEARCH_STEPS = 50

# scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4 (DDIM in place of PNDM).
SD14_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
SD14_TOKENS = 77


def sd14_unet_handle(device: str | torch.device, dtype: torch.dtype = torch.float16, seed: int = 0,
                     unet_config: dict = SD14_UNET_CONFIG) -> ModelHandle:
    """A handle around a randomly initialised SD v1.4 UNet, in latent space through the identity codec.

    It has no text encoder: give its analyses embeddings, not prompts. The
    tests pass a narrower `unet_config` of the same structure.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).eval().requires_grad_(False)
    codec = PassThroughCodec(latent_channels=unet_config["in_channels"], sample_size=unet_config["sample_size"])
    return ModelHandle(name="SD v1.4 UNet architecture, random weights", tokenizer=None, text_encoder=None, unet=unet,
                       codec=codec, scheduler=DDIMScheduler(**SD14_SCHEDULER_CONFIG), device=torch.device(device),
                       dtype=dtype)


def cpu_rows(repeats: int) -> tuple[list[tuple[str, str, str]], list[str], list[float]]:
    handle = load_model()
    target = handle.memorized[0]
    sampling = sampling_bench.measure(handle, repeats)
    dori = dori_bench.measure(handle, target.image, Start.random(0), encode_prompts(handle, [target.caption]),
                              repeats, SEARCH_STEPS)
    rows = [
        ("CPU, bundled model: `sample` / `StableDiffusionPipeline`, 4 seeds", f"{sampling['ratio']:.3f}",
         verdict(sampling["ratio"], sampling_bench.SAMPLING_RATIO_TARGET)),
        (f"CPU, bundled model: Dori step / bare forward + backward, batch {dori_bench.BATCH}", f"{dori['ratio']:.3f}",
         verdict(dori["ratio"], dori_bench.RATIO_TARGET)),
        (f"CPU, bundled model: Dori search, {SEARCH_STEPS} steps, batch {dori_bench.BATCH}",
         f"{statistics.median(dori['search_s']):.2f} s", ""),
    ]
    details = [f"CPU runs, in seconds: `sample` {_rounded(sampling['ours_s'])}, pipeline {_rounded(sampling['theirs_s'])}, "
               f"bare pass {_rounded(dori['bare_s'])}, Dori step {_rounded(dori['step_s'])}, "
               f"search {_rounded(dori['search_s'])}."]
    return rows, details, [sampling["load_before"], dori["load_after"]]


def sd14_rows(handle: ModelHandle, repeats: int, search_steps: int = SEARCH_STEPS
              ) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The Dori ratio, the search time and (on CUDA) the peak memory on an SD v1.4-architecture handle."""
    generator = torch.Generator().manual_seed(0)
    width = handle.unet.config.cross_attention_dim
    target = torch.randn(handle.latent_shape, generator=generator)
    start = Start.embedding(torch.randn((SD14_TOKENS, width), generator=generator))
    text = torch.randn((1, SD14_TOKENS, width), generator=generator)
    cuda = handle.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(handle.device)
    dori = dori_bench.measure(handle, target, start, text, repeats, search_steps)
    search = statistics.median(dori["search_s"])
    name = torch.cuda.get_device_name(handle.device) if cuda else "CPU"
    label = f"{name}, SD v1.4 UNet {str(handle.dtype).removeprefix('torch.')}"
    rows = [
        (f"{label}: Dori step / bare forward + backward, batch {dori_bench.BATCH}",
         f"{dori['ratio']:.3f}", verdict(dori["ratio"], dori_bench.RATIO_TARGET)),
        (f"{label}: Dori search, {search_steps} steps, batch {dori_bench.BATCH}", f"{search:.2f} s",
         verdict(search, GPU_SEARCH_SECONDS_TARGET, " s") if cuda else ""),
    ]
    if cuda:
        peak_gib = torch.cuda.max_memory_allocated(handle.device) / 2**30
        rows.append((f"{label}: peak GPU memory of the runs", f"{peak_gib:.1f} GiB", ""))
    details = [f"{name} runs{f' (torch CUDA {torch.version.cuda})' if cuda else ''}, in seconds: bare pass "
               f"{_rounded(dori['bare_s'])}, Dori step {_rounded(dori['step_s'])}, search {_rounded(dori['search_s'])}."]
    return rows, details


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_all.md"))
    parser.add_argument("--no-gpu", action="store_true", help="skip the SD v1.4 part even when CUDA is available")
    args = parser.parse_args(argv)

    rows, details, loads = cpu_rows(args.repeats)
    gpu = torch.cuda.is_available() and not args.no_gpu
    if gpu:
        gpu_table, gpu_details = sd14_rows(sd14_unet_handle("cuda"), args.repeats)
        rows += gpu_table
        details += gpu_details
    else:
        details.append("No CUDA device was available (or `--no-gpu`): the SD v1.4 fp16 part did not run.")
    write_report(
        args.out, "All speed targets in one run", f"python -m analysis.bench --repeats {args.repeats}",
        "The bundled model in float32 on the CPU; "
        + ("an SD v1.4-architecture UNet (random weights, published config) in float16 on the GPU. " if gpu else "")
        + f"Ratios are of medians over {args.repeats} repeats, as in `analysis.bench.sampling` and `analysis.bench.dori`.",
        rows, "\n".join(details), *loads)


if __name__ == "__main__":
    main()
