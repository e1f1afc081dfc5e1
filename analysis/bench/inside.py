"""How long do the Inside view's analyses take, and how much does attention capture slow sampling?

    python -m analysis.bench.inside [--repeats 5] [--out docs/results/bench_inside.md]

(a) `run_task` of "attention", "timeline" and "detect" for one seed of the first memorized caption on the
bundled model at its default steps and guidance (the reference distribution of "detect" is cached before
timing, as the app computes it once per model). Target: at most 3 s each.
(b) `analysis.sampling.sample` with and without `CrossAttentionCapture` on every cross-attention layer (maps
summed over every step), 4 seeds, interleaved; the ratio of medians. Target: at most 1.2.

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from analysis.attention import capture_attention
from analysis.bench import seconds, verdict, write_report
from analysis.model import load_model
from analysis.sampling import sample
from analysis.tasks import run_task

SEEDS = [0, 1, 2, 3]
VIEW_SECONDS_TARGET = 3.0
CAPTURE_RATIO_TARGET = 1.2
KINDS = ("attention", "timeline", "detect")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_inside.md"))
    args = parser.parse_args(argv)
    handle = load_model()
    prompt, steps, guidance = handle.memorized[0].caption, handle.default_steps, handle.default_guidance
    configs = {"attention": dict(image=0, seed=0), "timeline": dict(image=0, seed=0),
               "detect": dict(image=0, seeds=[0])}
    for kind, config in configs.items():  # warm-up; "detect" fills the reference cache
        run_task(handle, kind, config)

    def plain() -> None:
        sample(handle, [prompt], SEEDS, steps=steps, guidance=guidance)

    def captured() -> None:
        capture_attention(handle, [prompt], SEEDS, steps, guidance)

    load_before = os.getloadavg()[0]
    times = {kind: [] for kind in (*KINDS, "plain", "captured")}
    for repeat in range(args.repeats):
        for kind, config in configs.items():
            times[kind].append(seconds(lambda: run_task(handle, kind, config)))
        pair = [("plain", plain), ("captured", captured)]
        for name, run in pair if repeat % 2 == 0 else reversed(pair):
            times[name].append(seconds(run))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              flush=True)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = medians["captured"] / medians["plain"]
    rows = [(f"`run_task` \"{kind}\", 1 seed", f"{medians[kind]:.3f} s",
             verdict(medians[kind], VIEW_SECONDS_TARGET, " s")) for kind in KINDS]
    rows += [("`sample`, 4 seeds", f"{medians['plain']:.3f} s", ""),
             ("`sample` with attention capture, 4 seeds", f"{medians['captured']:.3f} s", ""),
             ("ratio with / without capture", f"{ratio:.3f}", verdict(ratio, CAPTURE_RATIO_TARGET))]
    write_report(
        args.out, "The Inside view's analyses on the bundled model", f"python -m analysis.bench.inside --repeats "
        f"{args.repeats}",
        f"Prompt “{prompt}”, DDIM {steps} steps, guidance {guidance}, float32 on CPU. Medians of {args.repeats} timed "
        "runs after one warm-up; sampling with and without capture interleaved.",
        rows, "Every run, in seconds: " + "; ".join(f"{k} {[round(s, 3) for s in v]}" for k, v in times.items()) + ".",
        load_before, os.getloadavg()[0])


if __name__ == "__main__":
    main()
