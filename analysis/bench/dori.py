"""How much does a Dori search cost beyond the UNet's own forward and backward passes?

    python -m analysis.bench.dori [--repeats 5] [--out docs/results/bench_dori.md]

(a) One step of `DoriSearch` (one start, batch 8) against one bare UNet
forward + backward of the same 8 rows (text embedding requires grad, UNet
parameters frozen, loss = mean of the squared output), on the bundled model.
A step's time is the gap between consecutive step callbacks, the median over
a short search; the bare pass's is the median of as many calls. Target: ratio
of the medians at most 1.15.
(b) A default search (50 steps, batch 8, one random start) end to end on the
bundled model. Target: at most 20 s.
Each repeat times (a) and (b), alternating which of (a)'s two goes first, so a
drift in machine load hits all of them.

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from analysis.bench import seconds, verdict, write_report
from analysis.dori import DoriSearch, DoriStep, Start
from analysis.model import ModelHandle, load_model
from analysis.sampling import encode_prompts

BATCH = 8
STEPS_PER_TIMING = 6  # steps (and bare passes) per repeat for (a)
RATIO_TARGET = 1.15
SEARCH_SECONDS_TARGET = 20.0


def measure(handle: ModelHandle, target_image: torch.Tensor, start: Start, text: torch.Tensor, repeats: int,
            search_steps: int = 50) -> dict:
    """Time (a) and (b) on `handle`: every repeat's seconds, the step/bare ratio of medians, the loads.

    `target_image` `[C, H, W]` is what the search aims at, `start` where it
    begins, `text` `[1, 77, d]` the embedding of the bare passes.
    """
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((BATCH, *handle.latent_shape), generator=generator).to(handle.device, handle.dtype)
    timesteps = torch.randint(0, handle.scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
    timesteps = timesteps.to(handle.device)
    text = text.to(handle.device, handle.dtype).repeat(BATCH, 1, 1)

    def bare_pass() -> None:
        embedding = text.clone().requires_grad_(True)
        prediction = handle.unet(latents, timesteps, encoder_hidden_states=embedding, return_dict=False)[0]
        prediction.float().square().mean().backward()

    def bare_median() -> float:
        return statistics.median(seconds(bare_pass) for _ in range(STEPS_PER_TIMING))

    def dori_step_median() -> float:
        stamps = []

        def stamp(step: DoriStep) -> None:
            stamps.append(time.perf_counter())

        # One step more than timed: the first gap starts at the first callback, after setup.
        DoriSearch(steps=STEPS_PER_TIMING + 1, batch_size=BATCH).fit(handle, target_image, [start], callback=stamp)
        return statistics.median(later - earlier for earlier, later in zip(stamps, stamps[1:]))

    def default_search() -> None:
        DoriSearch(steps=search_steps, batch_size=BATCH).fit(handle, target_image, [start])

    bare_pass()  # warm-up
    dori_step_median()

    load_before = os.getloadavg()[0]
    bare_s, step_s, search_s = [], [], []
    for repeat in range(repeats):
        pair = [(bare_median, bare_s), (dori_step_median, step_s)]
        for measure_one, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(measure_one())
        search_s.append(seconds(default_search))
        print(f"repeat {repeat + 1}/{repeats}: bare forward+backward {bare_s[-1]:.3f} s, "
              f"Dori step {step_s[-1]:.3f} s, {search_steps}-step search {search_s[-1]:.2f} s", flush=True)
    return dict(bare_s=bare_s, step_s=step_s, search_s=search_s,
                ratio=statistics.median(step_s) / statistics.median(bare_s),
                load_before=load_before, load_after=os.getloadavg()[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (at least 5 for a recorded result)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_dori.md"))
    args = parser.parse_args(argv)

    handle = load_model()
    target = handle.memorized[0]
    measured = measure(handle, target.image, Start.random(0), encode_prompts(handle, [target.caption]), args.repeats)
    bare_s, step_s, search_s = measured["bare_s"], measured["step_s"], measured["search_s"]
    load_before, load_after = measured["load_before"], measured["load_after"]
    bare_median_s, step_median_s = statistics.median(bare_s), statistics.median(step_s)
    search_median_s = statistics.median(search_s)
    ratio = measured["ratio"]
    rows = [
        (f"bare UNet forward + backward, batch {BATCH}", f"{bare_median_s:.3f} s", ""),
        (f"Dori step, batch {BATCH}", f"{step_median_s:.3f} s", ""),
        ("ratio Dori step / bare pass", f"{ratio:.3f}", verdict(ratio, RATIO_TARGET)),
        (f"Dori search, 50 steps, batch {BATCH}", f"{search_median_s:.2f} s",
         verdict(search_median_s, SEARCH_SECONDS_TARGET, " s")),
    ]
    write_report(
        args.out, "Dori search speed on the bundled model", f"python -m analysis.bench.dori --repeats {args.repeats}",
        f"Target image “{target.caption}”, one random start, float32 on CPU. Per repeat: the median of\n"
        f"{STEPS_PER_TIMING} bare passes and of {STEPS_PER_TIMING} search steps (interleaved, alternating order),\n"
        f"then one default search; the table gives the medians over {args.repeats} repeats.",
        rows,
        f"Every repeat, in seconds: bare pass {[round(s, 3) for s in bare_s]}, Dori step {[round(s, 3) for s in step_s]},\n"
        f"search {[round(s, 2) for s in search_s]}.",
        load_before, load_after)


if __name__ == "__main__":
    main()
