"""Mitigation as masks on the bundled demo model: NeMo neuron blocking and Wanda weight pruning.

    python -m analysis.experiments.mitigation [--seeds 10] [--nemo-seeds 4] [--held-out 5] [--nemo-refine]

For every memorized caption replicated on at least 80 % of seeds (the
target's starting point): a NeMo mask and a Wanda mask localized for it,
then the replication (share of seeds above the threshold, mean similarity to
the training photo) with no mitigation and under each mask; units removed per
layer; UNet evaluations NeMo spent. Effect on held-out captions: pixel
correlation between each held-out caption's generation without and with the
mask (same seed). NeMo's detection step on the held-out captions. An
investigation of why the masks fail (reference statistics, the step δ is read
at, whole layers, how many neurons, Wanda variants): `mitigation_investigation`.
Writes docs/results/mitigation.{md,json} and mitigation_grid.png.

Reference (non-memorized) prompts for NeMo's statistics and τ and for Wanda:
the held-out captions after the first 10 plus every 12th training shape
caption, so the evaluated held-out captions stay unseen by both localizers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analysis.demo.data import split_shape_specs
from analysis.experiments.mitigation_investigation import investigate
from analysis.experiments.mitigation_report import (INVESTIGATION_FILE, LOCALIZATION_FILE, SHOWN_SEEDS, mean,
                                                    render_markdown)
from analysis.images import image_grid
from analysis.localize import DEFAULT_CACHE_DIR
from analysis.localize.nemo import NeMo
from analysis.localize.nemo_delta import DeltaReading, DeltaSimilarity, noise_differences
from analysis.localize.saved import MASKS_DIR, mask_file
from analysis.localize.wanda import Wanda
from analysis.masks import generate
from analysis.metrics import REPLICATION_THRESHOLD, paired_similarity, replication
from analysis.model import ModelHandle, load_model

RESULTS = Path("docs/results")
RESERVED_HELD_OUT = 10  # the first held-out captions: kept out of the reference prompts, side effects measured on them


def replication_row(images: torch.Tensor, photo: torch.Tensor) -> dict:
    result = replication(images, photo)
    return dict(replicated=result.rate, mean_similarity=result.similarities.mean().item())



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per caption for replication")
    parser.add_argument("--nemo-seeds", type=int, default=4, help="seeds of NeMo's internal criterion")
    parser.add_argument("--held-out", type=int, default=5,
                        help=f"held-out captions to evaluate side effects on (of the first {RESERVED_HELD_OUT})")
    parser.add_argument("--min-replication", type=float, default=0.8,
                        help="localize only captions replicated at least this often without mitigation (the target's)")
    parser.add_argument("--nemo-refine", action="store_true",
                        help="run NeMo's refinement (one criterion evaluation per blocked neuron); off: its initial "
                             "selection, the largest mask it considers")
    parser.add_argument("--sparsity", type=float, default=0.01, help="Wanda's top share per output row")
    parser.add_argument("--investigation", action="store_true",
                        help="run only the investigation (mitigation_investigation.json); without it, only the "
                             "localization (mitigation.json); the markdown is rendered from whichever exist")
    parser.add_argument("--model", default=None, help="a model folder with a memorized.json (default: the bundled model)")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="localize only these memorized captions (indices in memorized.json)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    MASKS_DIR.mkdir(parents=True, exist_ok=True)

    started = time.time()
    handle = load_model(args.model)
    seeds, nemo_seeds = list(range(args.seeds)), list(range(args.nemo_seeds))
    if not 0 < args.held_out <= RESERVED_HELD_OUT:
        raise ValueError(f"--held-out must be in [1, {RESERVED_HELD_OUT}], got {args.held_out}")
    evaluation_prompts = handle.held_out_prompts[:args.held_out]
    reference_prompts = (handle.held_out_prompts[RESERVED_HELD_OUT:]
                         + [s.caption for s in split_shape_specs()[0][::12]])
    nemo = NeMo(reference_prompts=reference_prompts, refine=args.nemo_refine, cache_dir=DEFAULT_CACHE_DIR)
    wanda = Wanda(reference_prompts=reference_prompts, sparsity=args.sparsity, cache_dir=DEFAULT_CACHE_DIR)
    print(f"{len(handle.memorized)} memorized captions, {args.seeds} seeds, NeMo criterion on {args.nemo_seeds} seeds, "
          f"{len(evaluation_prompts)} held-out captions, {len(reference_prompts)} reference prompts", flush=True)
    held_out_before = generate(handle, evaluation_prompts, [0])
    if args.investigation:
        investigation = investigate(handle, reference_prompts, evaluation_prompts, held_out_before)
        investigation["wall_time_s"] = round(time.time() - started, 1)
        (args.out / INVESTIGATION_FILE).write_text(json.dumps(investigation, indent=1))
        render_markdown(args.out)
        return

    rows, grid_rows, not_localized = [], [], []
    held_out_under_first_masks = {}
    for index, item in enumerate(handle.memorized):
        if args.only is not None and index not in args.only:
            continue
        row = dict(caption=item.caption)
        baseline = generate(handle, [item.caption], seeds)
        row["none"] = replication_row(baseline, item.image)
        if row["none"]["replicated"] < args.min_replication:
            not_localized.append(row)
            print(f"{item.caption}: replicated {row['none']['replicated']:.2f} < {args.min_replication}, not localized",
                  flush=True)
            continue
        grid_row = [item.image[None], baseline[:SHOWN_SEEDS]]

        fit_started = time.time()
        nemo_mask = nemo.fit(handle, item.caption, seeds=nemo_seeds).mask_
        row["nemo_fit"] = dict(seconds=round(time.time() - fit_started, 1), unet_evaluations=nemo.unet_evaluations_,
                               threshold=nemo.threshold_, memorized_seeds=nemo.memorized_seeds_,
                               rounds=len(nemo.trace_), final_similarity=nemo.similarity_, settings=nemo.settings_,
                               initial_neurons=nemo.trace_[-1].neurons if nemo.trace_ else {})
        fit_started = time.time()
        wanda_mask = wanda.fit(handle, item.caption).mask_
        row["wanda_fit"] = dict(seconds=round(time.time() - fit_started, 1))

        for method, mask in (("nemo", nemo_mask), ("wanda", wanda_mask)):
            mitigated = generate(handle, [item.caption], seeds, mask)
            held_out_after = generate(handle, evaluation_prompts, [0], mask)
            row[method] = dict(**replication_row(mitigated, item.image), removed=mask.counts(),
                               held_out_correlation=paired_similarity(held_out_before, held_out_after))
            mask.save(mask_file(handle, method, index))
            grid_row.append(mitigated[:SHOWN_SEEDS])
            held_out_under_first_masks.setdefault(method, held_out_after)
        grid_rows.append(torch.cat(grid_row))
        rows.append(row)
        print_row(row, args.seeds)

    grid_rows += [held_out_before, held_out_under_first_masks["nemo"], held_out_under_first_masks["wanda"]]
    image_grid(grid_rows, scale=3).save(args.out / "mitigation_grid.png")

    detection = held_out_detection(handle, evaluation_prompts, nemo_seeds, nemo)
    summary = summarize(rows, detection, args, time.time() - started)
    (args.out / LOCALIZATION_FILE).write_text(json.dumps(dict(
        summary=summary, captions=rows, not_localized=not_localized, held_out_detection=detection,
        reference_prompts=reference_prompts, evaluation_prompts=evaluation_prompts), indent=1))
    render_markdown(args.out)
    print(json.dumps(summary, indent=1))



def print_row(row: dict, n: int) -> None:
    cells = [f"{row[m]['replicated'] * n:>3.0f}/{n} {row[m]['mean_similarity']:.2f}" for m in ("none", "nemo", "wanda")]
    print(f"{row['caption'][:40]:40s} | {' | '.join(cells)} | NeMo {sum(row['nemo']['removed'].values())} neurons, "
          f"{row['nemo_fit']['unet_evaluations']} UNet rows | Wanda {sum(row['wanda']['removed'].values())} weights | "
          f"held-out corr NeMo {row['nemo']['held_out_correlation']:.3f} Wanda {row['wanda']['held_out_correlation']:.3f}",
          flush=True)


def held_out_detection(handle: ModelHandle, prompts: list[str], seeds: list[int], nemo: NeMo) -> dict:
    """NeMo's detection step on never-trained captions: the share of seeds whose δ has MS-SSIM > τ with another.

    With τ = mean + 1 std of exactly that pairwise similarity, a non-memorized
    caption's seed is flagged whenever one of its n − 1 pairs lands in the top
    ~16 %, so many held-out captions get a flagged seed by construction.
    """
    settings = nemo.settings_
    reading = DeltaReading(settings["steps"], settings["step_index"], settings["advance_latents"])
    deltas = noise_differences(handle, prompts, seeds, reading)
    similarity = DeltaSimilarity(settings["window"], settings["scales"], settings["ms_ssim"])
    flagged = [(similarity.max_with_other_seeds(per_prompt) > nemo.threshold_)
               .float().mean().item()
               for per_prompt in deltas.split(len(seeds))]
    return dict(threshold=nemo.threshold_, flagged_share_per_prompt=flagged,
                prompts_with_a_flagged_seed=sum(share > 0 for share in flagged))


def summarize(rows: list[dict], detection: dict, args, seconds: float) -> dict:
    summary = dict(seeds=args.seeds, nemo_seeds=args.nemo_seeds, nemo_refine=args.nemo_refine,
                   wanda_sparsity=args.sparsity, min_replication=args.min_replication,
                   threshold=REPLICATION_THRESHOLD, wall_time_s=round(seconds, 1))
    for method in ("none", "nemo", "wanda"):
        summary[f"{method}_mean_replicated"] = mean(row[method]["replicated"] for row in rows)
        summary[f"{method}_mean_similarity"] = mean(row[method]["mean_similarity"] for row in rows)
    for method in ("nemo", "wanda"):
        summary[f"{method}_held_out_correlation"] = mean(row[method]["held_out_correlation"] for row in rows)
        summary[f"{method}_mean_removed"] = mean(sum(row[method]["removed"].values()) for row in rows)
    summary["nemo_mean_unet_evaluations"] = mean(row["nemo_fit"]["unet_evaluations"] for row in rows)
    summary["held_out_prompts_with_a_flagged_seed"] = detection["prompts_with_a_flagged_seed"]
    return summary



if __name__ == "__main__":
    main()
