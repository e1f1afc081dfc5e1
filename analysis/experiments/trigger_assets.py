"""Build the trigger sets shipped in assets/triggers/: Dori triggers from random starts for every memorized image.

    python -m analysis.experiments.trigger_assets [--count 8] [--batch-size 2] [--steps 50] [--eval-seeds 2]

One folder per memorized image of the bundled model, `assets/triggers/image-{i}`
(i: its position in `handle.memorized`), holding an `analysis.triggers`
set: `--count` searches from `Start.random(i)`, each `--steps` Adam steps at
Dori's learning rate against the unmitigated model with `--batch-size` (ε, t) pairs per
start and step, 16 starts batched per search; every trigger
then generated with `--eval-seeds` seeds to store its replication rate. The
defaults are sized for a shared 2-core CPU (the paper's per-start batch is
8) and keep the folder at a few MB. A rerun resumes what
is there; `--count` larger than before needs a new folder (the set's config
is part of its identity). `--image` limits the run to some images, e.g.
`--image 0 --count 100` for the dispersion experiment's 100-trigger set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analysis.dori import DoriSearch
from analysis.model import load_model
from analysis.triggers import SHIPPED_TRIGGERS, TriggerSet, build_trigger_set, shipped_set_folder

# Starts searched together: one batch is saved at a time, so an interrupted run loses at most this many.
STARTS_PER_BATCH = 16


def shipped_trigger_sets(root: str | Path = SHIPPED_TRIGGERS) -> dict[str, TriggerSet]:
    """Every complete shipped trigger set, by the caption of its image."""
    sets = [TriggerSet.load(folder) for folder in sorted(Path(root).glob("image-*")) if folder.is_dir()]
    return {trigger_set.config["caption"]: trigger_set for trigger_set in sets if trigger_set.complete}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="triggers per image")
    parser.add_argument("--batch-size", type=int, default=2, help="(ε, t) pairs per start and step")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-seeds", type=int, default=2, help="generation seeds per trigger")
    parser.add_argument("--image", type=int, nargs="*", help="indices into the memorized images (default: all)")
    parser.add_argument("--out", type=Path, default=SHIPPED_TRIGGERS)
    args = parser.parse_args(argv)

    handle = load_model()
    search = DoriSearch(steps=args.steps, batch_size=args.batch_size)
    indices = range(len(handle.memorized)) if args.image is None else args.image
    for index in indices:
        image = handle.memorized[index]
        started = time.time()
        trigger_set = build_trigger_set(handle, shipped_set_folder(index, args.out), image, count=args.count, search=search,
                                        starts_per_batch=min(args.count, STARTS_PER_BATCH),
                                        evaluation_seeds=range(args.eval_seeds))
        rates = [trigger["replication_rate"] for trigger in trigger_set.triggers]
        print(f"image {index} “{image.caption}”: {len(rates)} triggers, "
              f"mean replication {sum(rates) / len(rates):.2f}, {time.time() - started:.0f} s", flush=True)
    summary = {}
    for folder in sorted(args.out.glob("image-*")):
        trigger_set = TriggerSet.load(folder)
        rates = [trigger["replication_rate"] for trigger in trigger_set.triggers]
        summary[folder.name] = dict(caption=trigger_set.config["caption"], count=len(rates),
                                    complete=trigger_set.complete, mean_replication=sum(rates) / max(len(rates), 1))
    (args.out / "index.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
