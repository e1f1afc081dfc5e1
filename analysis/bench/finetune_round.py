"""How long does one round of the Fine-tune view's run take on the bundled model, stage by stage?

    OMP_NUM_THREADS=1 nice -n 5 python -m analysis.bench.finetune_round [--out docs/results/bench_finetune_round.md]

One `run_task("finetune", ...)` of one round with the engine's per-round settings (triggers per image, Dori
steps and batch, training steps, evaluation seeds) for the first memorized image, in a fresh folder. Every
`FineTuneProgress` event is timed, so the report gives each stage's seconds: the once-per-run stages
(surrogate images, normal pairs) apart from a round's (triggers, train, evaluate). The Fine-tune view's
defaults are chosen from these numbers so that its run finishes within the app's time limit
(`analysis.limits.MAX_RUN_SECONDS`) on the machine measured.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from analysis.bench import write_report
from analysis.finetune import AdversarialFineTuning, FineTuneProgress
from analysis.limits import MAX_RUN_SECONDS
from analysis.model import load_model
from analysis.tasks import run_task

ROUND_STAGES = ("triggers", "train", "evaluate")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_finetune_round.md"))
    args = parser.parse_args(argv)
    handle = load_model()
    defaults = AdversarialFineTuning()
    parameters = dict(rounds=1, steps_per_round=defaults.steps_per_round,
                      triggers_per_image=defaults.triggers_per_image, eval_seeds=defaults.eval_seeds,
                      dori=dict(steps=defaults.dori.steps, batch_size=defaults.dori.batch_size))
    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def timed(event: object) -> None:
        if isinstance(event, FineTuneProgress):
            now = time.perf_counter()
            stages[event.stage] = stages.get(event.stage, 0.0) + now - last[0]
            last[0] = now

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        last[0] = started
        run_task(handle, "finetune", dict(targets=[0], parameters=parameters, out_dir=folder, resume=False),
                 callback=timed)
        total = time.perf_counter() - started
    per_round = sum(stages.get(stage, 0.0) for stage in ROUND_STAGES)
    once = total - per_round
    fits = int((MAX_RUN_SECONDS - once) // per_round) if per_round else 0
    rows = [(stage, f"{seconds:.1f} s", "per round" if stage in ROUND_STAGES else "once per run")
            for stage, seconds in stages.items()]
    rows += [("one round (triggers + train + evaluate)", f"{per_round:.1f} s", ""),
             ("the whole one-round run", f"{total:.1f} s", ""),
             (f"rounds that fit in {MAX_RUN_SECONDS} s", str(fits), "")]
    write_report(args.out, "One fine-tuning round on the bundled model",
                 "OMP_NUM_THREADS=1 nice -n 5 python -m analysis.bench.finetune_round",
                 f"Settings per round: {parameters} (the engine's defaults, one round), the first memorized image.",
                 rows, f"Stage seconds: {stages}", load_before, os.getloadavg()[0],
                 headers=("stage", "seconds", "when"))


if __name__ == "__main__":
    main()
