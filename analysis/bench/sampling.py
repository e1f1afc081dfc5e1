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
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline

from analysis.model import load_model
from analysis.replicate import replicate
from analysis.sampling import sample

SEEDS = [0, 1, 2, 3]
SAMPLING_RATIO_TARGET = 1.05
REPLICATION_SECONDS_TARGET = 3.0


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_sampling.md"))
    args = parser.parse_args(argv)

    handle = load_model()
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
    for repeat in range(args.repeats):
        pair = [(ours, ours_s), (theirs, theirs_s)]
        for run, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(seconds(run))
        replicate_s.append(seconds(lambda: replicate(handle, 0, SEEDS)))
        print(f"repeat {repeat + 1}/{args.repeats}: sample {ours_s[-1]:.3f} s, pipeline {theirs_s[-1]:.3f} s, "
              f"replicate {replicate_s[-1]:.3f} s", flush=True)
    load_after = os.getloadavg()[0]

    ours_median, theirs_median = statistics.median(ours_s), statistics.median(theirs_s)
    replicate_median = statistics.median(replicate_s)
    ratio = ours_median / theirs_median
    rows = [
        ("`sample`, 4 seeds", f"{ours_median:.3f} s", ""),
        ("`StableDiffusionPipeline`, 4 seeds", f"{theirs_median:.3f} s", ""),
        ("ratio `sample` / pipeline", f"{ratio:.3f}",
         f"≤ {SAMPLING_RATIO_TARGET}: {'met' if ratio <= SAMPLING_RATIO_TARGET else 'NOT met'}"),
        ("`replicate`, 4-seed gallery", f"{replicate_median:.3f} s",
         f"≤ {REPLICATION_SECONDS_TARGET} s: {'met' if replicate_median <= REPLICATION_SECONDS_TARGET else 'NOT met'}"),
    ]
    table = "\n".join(["| what | median | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])
    report = f"""# Sampling speed on the bundled model

Written by `python -m analysis.bench.sampling --repeats {args.repeats}` on {datetime.date.today().isoformat()}.
Prompt “{prompt}”, seeds {SEEDS}, DDIM {steps} steps, guidance {guidance}, float32 on CPU.
Medians of {args.repeats} timed runs after one warm-up; `sample` and the pipeline run interleaved.

{table}

Every run, in seconds: `sample` {[round(s, 3) for s in ours_s]}, pipeline {[round(s, 3) for s in theirs_s]},
`replicate` {[round(s, 3) for s in replicate_s]}.

Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()},
1-minute load average {load_before:.2f} before and {load_after:.2f} after the timed runs.
Versions: Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__},
transformers {transformers.__version__}.
"""
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
