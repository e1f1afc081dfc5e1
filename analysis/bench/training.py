"""How fast does the demo model train on this machine's CPU?

    python -m analysis.bench.training [--repeats 5] [--out docs/results/bench_training.md] [--compile]

Times `analysis.demo.train.training_step` (a fresh v2-recipe batch, the UNet's forward and backward, AdamW, the EMA
update) at batch 32, 64 and 128, on 1 and 2 threads, in float32 and with bfloat16 autocast, each in the default
and the channels_last memory format. Every configuration starts from the same freshly initialised UNet and runs
three warm-up steps before `--repeats` timed ones. `--compile` adds `torch.compile` (inductor) at batch 32 on 2 threads
for the fastest precision and layout found there.

Run it on a quiet machine: other processes on the cores change the numbers.
"""

from __future__ import annotations

import copy
import os
import statistics
from pathlib import Path

import torch

from analysis.bench import parse_bench_args, seconds, write_report
from analysis.demo import train
from analysis.demo.architecture import build_scheduler, build_unet
from analysis.demo.data import DemoDataset

BATCHES = (32, 64, 128)
THREADS = (1, 2)
VARIANTS = {  # name -> (bf16 autocast, channels_last)
    "float32": (False, False),
    "float32, channels_last": (False, True),
    "bf16 autocast": (True, False),
    "bf16 autocast, channels_last": (True, True),
}
# The recipe the timings stand for; the data's shape and the model are what cost, not the photo weights.
RECIPE = ["--data", "v2", "--photo-share", "0.1", "--coco-share", "0.3", "--offset-noise", "0.1", "--device", "cpu"]
TOKENIZER_SOURCE = Path("assets/demo_model")
WARM_UP_STEPS = 3


def time_steps(batch: int, threads: int, bf16: bool, channels_last: bool, repeats: int,
               compile_unet: bool = False) -> list[float]:
    """Seconds of each of `repeats` training steps after warm-up, for one configuration."""
    torch.set_num_threads(threads)
    args = train.parse_args(RECIPE + ["--batch-size", str(batch)] + (["--bf16"] if bf16 else [])
                            + (["--channels-last"] if channels_last else []))
    data = DemoDataset(photo_share=args.photo_share, caption_dropout=args.caption_dropout, seed=0,
                       recipe=args.data, coco_share=args.coco_share)
    unet = build_unet(seed=0).train()
    tokenizer, text_encoder, _ = train.init_from(TOKENIZER_SOURCE, build_unet(seed=0))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    embed = train.CaptionCache(tokenizer, text_encoder.eval().requires_grad_(False), torch.device("cpu"))
    alphas = build_scheduler().alphas_cumprod
    model = torch.compile(unet) if compile_unet else unet
    # oneDNN builds its kernels on the first steps (2-5x slower than later ones).
    for _ in range(WARM_UP_STEPS + (2 if compile_unet else 0)):
        train.training_step(model, ema, optimizer, data, embed, alphas, args)
    return [seconds(lambda: train.training_step(model, ema, optimizer, data, embed, alphas, args))
            for _ in range(repeats)]


def main(argv=None) -> None:
    args = parse_bench_args(argv, __doc__, "docs/results/bench_training.md", "timed training steps per configuration",
                            lambda parser: parser.add_argument("--compile", action="store_true",
                                                               help="also time torch.compile at batch 32, 2 threads"))
    load_before = os.getloadavg()[0]
    rows, runs = [], []
    fastest: dict[tuple[int, int], tuple[float, str]] = {}
    for batch in BATCHES:
        for threads in THREADS:
            baseline = None
            for name, (bf16, channels_last) in VARIANTS.items():
                times = time_steps(batch, threads, bf16, channels_last, args.repeats)
                median = statistics.median(times)
                baseline = baseline or median
                rows.append((f"batch {batch}, {threads} thread{'s' if threads > 1 else ''}, {name}",
                             f"{median:.3f} s/step", f"{batch / median:.1f} images/s, ×{baseline / median:.2f}"))
                runs.append(f"batch {batch}, {threads} threads, {name}: {[round(t, 3) for t in times]}")
                print(rows[-1], flush=True)
                if median < fastest.get((batch, threads), (float("inf"), ""))[0]:
                    fastest[(batch, threads)] = (median, name)
    if args.compile:
        name = fastest[(32, 2)][1]
        bf16, channels_last = VARIANTS[name]
        times = time_steps(32, 2, bf16, channels_last, args.repeats, compile_unet=True)
        median = statistics.median(times)
        rows.append((f"batch 32, 2 threads, {name}, torch.compile", f"{median:.3f} s/step",
                     f"{32 / median:.1f} images/s, ×{fastest[(32, 2)][0] / median:.2f} against the same uncompiled"))
        runs.append(f"batch 32, 2 threads, {name}, compiled: {[round(t, 3) for t in times]}")
    write_report(
        args.out, "Training the demo model on the CPU",
        f"python -m analysis.bench.training --repeats {args.repeats}{' --compile' if args.compile else ''}",
        "`analysis.demo.train.training_step` on the v2 recipe (`" + " ".join(RECIPE) + "`), the demo UNet from its "
        f"seeded initialisation, {WARM_UP_STEPS} warm-up steps, then {args.repeats} timed steps; × is the speed-up against float32 "
        "in the default layout at the same batch and threads.",
        rows, "Every timed step, in seconds:\n\n" + "\n".join(f"- {r}" for r in runs),
        load_before, os.getloadavg()[0], headers=("configuration", "median", "throughput, speed-up"))


if __name__ == "__main__":
    main()
