"""Memorization detectors and the denoising timeline on the bundled model: captions, Dori triggers, NeMo.

    python -m analysis.experiments.inside [--seeds 4] [--timeline-seeds 2]

1. Detectors (`analysis.detectors`: Wen et al.'s noise gap, Ren et al.'s attention entropy, the bright ending),
   each averaged over `--seeds` seeds at the model's sampling settings. AUC (the Mann–Whitney statistic; above
   0.5: higher for the first set) of:
   * the 8 memorized captions vs the model's held-out prompts (its reference distribution);
   * the shipped Dori triggers (assets/triggers) vs as many random embeddings drawn as Dori's random starts;
   * the triggers under the NeMo mask of their image's caption (the mitigation experiment's masks,
     runs/mitigation_masks, fitted and saved there when missing) vs as many of the random embeddings under that
     mask (each random embedding is used under one image's mask).
2. The denoising timeline (`analysis.timeline`) of each caption and each trigger with `--timeline-seeds` seeds:
   the step from which x̂₀ stays a replica (pixel correlation > 0.75) to the end, among the runs that replicate.

Writes docs/results/inside.md and inside.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from analysis.detectors import DETECTORS, detector_scores, reference_scores
from analysis.dispersion import reference_sets
from analysis.localize.saved import saved_mask
from analysis.metrics import roc_auc
from analysis.model import ModelHandle, load_model
from analysis.timeline import denoising_timeline
from analysis.triggers import TriggerSet, shipped_set_folder

RESULTS = Path("docs/results")
# Random embeddings start far from the shipped sets' starts (seeds 0..N), which the searches moved away from anyway.
RANDOM_SEED = 10_000
# Rows of one detector pass: bounds its memory.
CHUNK = 16


def scores_of(handle: ModelHandle, conditioning: list[str] | torch.Tensor, seeds: list[int]) -> dict[str, list]:
    """Each detector's score per prompt or embedding, in chunks."""
    parts = [detector_scores(handle, conditioning[start:start + CHUNK], seeds, handle.default_steps,
                             handle.default_guidance) for start in range(0, len(conditioning), CHUNK)]
    return {name: torch.cat([part[name] for part in parts]).tolist() for name in DETECTORS}


def aucs(positive: dict[str, list], negative: dict[str, list]) -> dict[str, float]:
    return {name: roc_auc(positive[name], negative[name]) for name in DETECTORS}


def lock_in_steps(handle: ModelHandle, runs: list[tuple[int, str | torch.Tensor]], seeds: list[int]) -> dict:
    """Lock-in steps of (image index, prompt or embedding) runs: those that end as replicas, and how many do."""
    steps, first = [], []
    for index, conditioning in runs:
        for seed in seeds:
            timeline = denoising_timeline(handle, conditioning, seed, handle.default_steps, handle.default_guidance,
                                          handle.memorized[index].image)
            steps.append(timeline.lock_in_step(handle.replication_metric.threshold))
            first.append(timeline.similarities[0].item())
    locked = [step for step in steps if step is not None]
    return dict(runs=len(steps), replicate=len(locked), steps=steps, first_step_similarity=statistics.mean(first),
                mean=statistics.mean(locked) if locked else None,
                median=statistics.median(locked) if locked else None)


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inside.json").write_text(json.dumps(results, indent=1) + "\n")
    settings = results["settings"]
    lines = ["# Inside the denoising: detectors and lock-in on the bundled model", "",
             f"Written by `python -m analysis.experiments.inside` in {results['seconds']:.0f} s on "
             f"{settings['threads']} CPU thread(s). Sampling: the model's {settings['steps']} steps, guidance "
             f"{settings['guidance']}; detector scores are means over seeds {settings['seeds']}; the replication "
             f"metric is {settings['metric']}. AUC above 0.5: the score is higher for the first set.", "",
             "## Detector AUCs", "",
             "| comparison | " + " | ".join(DETECTORS) + " |", "|---|" + "---|" * len(DETECTORS)]
    for name, row in results["auc"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.3f}" for d in DETECTORS) + " |")
    counts = results["counts"]
    lines += ["", f"{counts['captions']} memorized captions, {counts['held_out']} held-out prompts (the model's "
                  f"reference prompts), {counts['triggers']} shipped triggers, {counts['random']} random embeddings "
                  "(Dori's random-start distribution). Under NeMo, each image's triggers and as many random embeddings "
                  "(each used once) run with the NeMo mask of that image's caption; images done: "
                  f"{counts['nemo_images']} of {counts['captions']}.", "",
              "## When does the copy lock in?", "",
              f"The first step from which x̂₀ (and the final image) stays above the threshold, over seeds "
              f"{settings['timeline_seeds']}; steps count from 0 of {settings['steps']}.", "",
              "| conditioning | runs | end as replicas | mean lock-in step | median | mean similarity of x̂₀ at step 0 |",
              "|---|---|---|---|---|---|"]
    for name, row in results["lock_in"].items():
        mean = "–" if row["mean"] is None else f"{row['mean']:.2f}"
        median = "–" if row["median"] is None else f"{row['median']:g}"
        lines.append(f"| {name} | {row['runs']} | {row['replicate']} | {mean} | {median} | "
                     f"{row['first_step_similarity']:.3f} |")
    (RESULTS / "inside.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per detector score")
    parser.add_argument("--timeline-seeds", type=int, default=2, help="seeds per timeline")
    args = parser.parse_args(argv)
    started = time.time()
    handle = load_model(None)
    seeds, timeline_seeds = list(range(args.seeds)), list(range(args.timeline_seeds))
    sets = {index: TriggerSet.load(shipped_set_folder(index)) for index in range(len(handle.memorized))}
    triggers = [(index, embedding) for index, trigger_set in sets.items() for embedding in trigger_set.embeddings]
    random = reference_sets(handle, n_random=len(triggers), seed=RANDOM_SEED)["random"]
    captions = [image.caption for image in handle.memorized]

    # Each section is written as soon as it is done, so an interrupted run still reports what it measured.
    results = dict(
        settings=dict(steps=handle.default_steps, guidance=handle.default_guidance, seeds=seeds,
                      timeline_seeds=timeline_seeds, metric=handle.replication_metric.describe(),
                      threads=torch.get_num_threads()),
        counts=dict(captions=len(captions), triggers=len(triggers), random=len(random), nemo_images=[]),
        auc={}, lock_in={}, scores={})
    scores = results["scores"]

    def done(message: str) -> None:
        results["seconds"] = time.time() - started
        write(results)
        print(f"[{results['seconds']:6.0f} s] {message}", flush=True)

    scores["captions"] = scores_of(handle, captions, seeds)
    scores["held_out"] = {name: values.tolist() for name, values in reference_scores(
        handle, handle.default_steps, handle.default_guidance, seeds).items() if name in DETECTORS}
    results["counts"]["held_out"] = len(scores["held_out"]["noise_gap"])
    results["auc"]["memorized captions vs held-out prompts"] = aucs(scores["captions"], scores["held_out"])
    done("captions and held-out prompts scored")
    scores["triggers"] = scores_of(handle, torch.stack([embedding for _, embedding in triggers]), seeds)
    scores["random"] = scores_of(handle, random, seeds)
    results["auc"]["Dori triggers vs random embeddings"] = aucs(scores["triggers"], scores["random"])
    done("triggers and random embeddings scored")
    results["lock_in"]["memorized captions"] = lock_in_steps(handle, list(enumerate(captions)), timeline_seeds)
    results["lock_in"]["Dori triggers"] = lock_in_steps(handle, triggers, timeline_seeds)
    done("timelines done")
    scores["triggers_under_nemo"] = under_nemo = {name: [] for name in DETECTORS}
    scores["random_under_nemo"] = random_under_nemo = {name: [] for name in DETECTORS}
    offset = 0
    for index, trigger_set in sets.items():
        count = len(trigger_set.embeddings)
        paired, offset = random[offset:offset + count], offset + count
        with saved_mask(handle, "nemo", index, save=True).applied(handle):
            for collected, embeddings in ((under_nemo, trigger_set.embeddings), (random_under_nemo, paired)):
                for name, values in scores_of(handle, embeddings, seeds).items():
                    collected[name] += values
        results["counts"]["nemo_images"].append(index)
        results["auc"]["Dori triggers vs random embeddings, both under NeMo"] = aucs(under_nemo, random_under_nemo)
        done(f"image {index} under NeMo scored")


if __name__ == "__main__":
    main()
