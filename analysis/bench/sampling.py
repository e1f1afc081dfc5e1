"""How fast is the project's sampling loop, and how long does the Replicate view take?

    python -m analysis.bench.sampling [--repeats 5] [--out docs/results/bench_sampling.md]

(a) `analysis.sampling.sample` against diffusers' `StableDiffusionPipeline`
built from the same components, on the bundled model: same prompt, 4 seeds,
the model's default steps and guidance. The two run interleaved (alternating
which goes first), so a drift in machine load hits both; the result is the
ratio of medians. Target: at most 1.05.
(b) `analysis.replicate.replicate` end to end (sampling and similarity) for a
4-seed gallery on the bundled model. Target: at most 3 s.

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from analysis.bench import seconds, verdict, write_report
from analysis.model import ModelHandle, load_model
from analysis.replicate import replicate
from analysis.sampling import sample

SEEDS = [0, 1, 2, 3]
SAMPLING_RATIO_TARGET = 1.05
REPLICATION_SECONDS_TARGET = 3.0


def measure(handle: ModelHandle, repeats: int) -> dict:
    """Time (a) and (b) on `handle`, `repeats` interleaved runs after one warm-up: every run's seconds and the medians."""
    prompt = handle.memorized[0].caption
    steps, guidance = handle.default_steps, handle.default_guidance
    # A scheduler of the pipeline's own, so the handle's stays untouched.
    pipe = StableDiffusionPipeline(vae=handle.codec, text_encoder=handle.text_encoder, tokenizer=handle.tokenizer,
                                   unet=handle.unet, scheduler=DDIMScheduler.from_config(handle.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours() -> torch.Tensor:
        return sample(handle, [prompt], SEEDS, steps=steps, guidance=guidance).images

    def theirs() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        images = pipe([prompt], num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(SEEDS),
                      generator=generators, output_type="pt").images
        return images * 2 - 1

    # The warm-up run doubles as a check that both do the same work.
    torch.testing.assert_close(ours(), theirs(), rtol=0, atol=1e-4)
    replicate(handle, 0, SEEDS)

    load_before = os.getloadavg()[0]
    ours_s, theirs_s, replicate_s = [], [], []
    for repeat in range(repeats):
        pair = [(ours, ours_s), (theirs, theirs_s)]
        for run, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(seconds(run))
        replicate_s.append(seconds(lambda: replicate(handle, 0, SEEDS)))
        print(f"repeat {repeat + 1}/{repeats}: sample {ours_s[-1]:.3f} s, pipeline {theirs_s[-1]:.3f} s, "
              f"replicate {replicate_s[-1]:.3f} s", flush=True)
    return dict(prompt=prompt, steps=steps, guidance=guidance, ours_s=ours_s, theirs_s=theirs_s,
                replicate_s=replicate_s, ratio=statistics.median(ours_s) / statistics.median(theirs_s),
                load_before=load_before, load_after=os.getloadavg()[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_sampling.md"))
    args = parser.parse_args(argv)

    measured = measure(load_model(), args.repeats)
    ours_s, theirs_s, replicate_s = measured["ours_s"], measured["theirs_s"], measured["replicate_s"]
    prompt, steps, guidance = measured["prompt"], measured["steps"], measured["guidance"]
    load_before, load_after = measured["load_before"], measured["load_after"]
    ours_median, theirs_median = statistics.median(ours_s), statistics.median(theirs_s)
    replicate_median = statistics.median(replicate_s)
    ratio = measured["ratio"]
    rows = [
        ("`sample`, 4 seeds", f"{ours_median:.3f} s", ""),
        ("`StableDiffusionPipeline`, 4 seeds", f"{theirs_median:.3f} s", ""),
        ("ratio `sample` / pipeline", f"{ratio:.3f}", verdict(ratio, SAMPLING_RATIO_TARGET)),
        ("`replicate`, 4-seed gallery", f"{replicate_median:.3f} s",
         verdict(replicate_median, REPLICATION_SECONDS_TARGET, " s")),
    ]
    write_report(
        args.out, "Sampling speed on the bundled model", f"python -m analysis.bench.sampling --repeats {args.repeats}",
        f"Prompt “{prompt}”, seeds {SEEDS}, DDIM {steps} steps, guidance {guidance}, float32 on CPU.\n"
        f"Medians of {args.repeats} timed runs after one warm-up; `sample` and the pipeline run interleaved.",
        rows,
        f"Every run, in seconds: `sample` {[round(s, 3) for s in ours_s]}, pipeline {[round(s, 3) for s in theirs_s]},\n"
        f"`replicate` {[round(s, 3) for s in replicate_s]}.",
        load_before, load_after)


if __name__ == "__main__":
    main()
