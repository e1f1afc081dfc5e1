"""What the project's own NeMo settings change against the authors' code, measured on the bundled model.

    python -m analysis.experiments.nemo_differences [--seeds 4] [--held-out 8] [--no-fits]

With the "pixel" settings (δ after two DDIM steps, 7x7 window) and the Mitigate view's 4 localizer seeds:

1. MS-SSIM: between-seed MS-SSIM of δ with data range 1 at every scale (the project's "range1") against the
   authors' torchmetrics call ("torchmetrics": data range inferred per scale from the batch, exponents 0.33), on
   the memorized captions and `--held-out` held-out prompts; each prompt's pairs compared in one batch.
2. Neurons listed twice: per memorized caption, how many neurons of the initial selection's last round are both
   outliers and top-k, and, unless `--no-fits`, the refined masks with the project's list (each neuron once) and
   the authors' (those neurons twice), with the view's other defaults.

Writes docs/results/nemo_differences.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from analysis.hooks import nemo_layers
from analysis.localize.nemo import SETTINGS, NeMo, record_activations, reference_statistics
from analysis.localize.nemo_delta import DeltaReading, DeltaSimilarity, noise_differences
from analysis.localize.nemo_selection import selected_neurons
from analysis.model import ModelHandle, load_model

OUT = Path("docs/results/nemo_differences.md")


def ms_ssim_differences(handle: ModelHandle, prompts: list[str], seeds: list[int]) -> list[dict]:
    """Per prompt: its between-seed MS-SSIM with each kind (lists over the pairs)."""
    settings = SETTINGS["pixel"]
    reading = DeltaReading(handle.default_steps, settings["step_index"], settings["advance_latents"])
    kinds = {kind: DeltaSimilarity(settings["window"], settings["scales"], kind) for kind in ("range1", "torchmetrics")}
    pairs = torch.combinations(torch.arange(len(seeds)), r=2)
    rows = []
    for prompt, deltas in zip(prompts, noise_differences(handle, prompts, seeds, reading).split(len(seeds))):
        rows.append({kind: similarity(deltas[pairs[:, 0]], deltas[pairs[:, 1]]).tolist()
                     for kind, similarity in kinds.items()})
    return rows


def listed_twice(handle: ModelHandle, model: NeMo, caption: str) -> int:
    """Neurons both outlier and top-k in the last round of `model`'s initial selection for `caption`."""
    layers = nemo_layers(handle.unet)
    reference = reference_statistics(handle, layers, handle.held_out_prompts)
    activations = record_activations(handle, layers, [caption])
    last = model.trace_[-1]
    twice = 0
    for name, (mean, std) in reference.items():
        listed = selected_neurons(activations[name][0], (activations[name][0] - mean).abs() / std.clamp_min(1e-12),
                                  last.theta, last.k, duplicates=True)
        twice += len(listed) - len(set(listed))
    return twice


def spread(values: list[float]) -> str:
    return f"{min(values):+.3f} / {statistics.mean(values):+.3f} / {max(values):+.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--no-fits", action="store_true", help="skip the refined masks with the authors' list")
    arguments = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(arguments)
    started = time.perf_counter()
    handle = load_model()
    seeds = list(range(args.seeds))
    captions = [m.caption for m in handle.memorized]
    held_out = list(handle.held_out_prompts[:args.held_out])
    measured = ms_ssim_differences(handle, captions + held_out, seeds)
    lines = []
    for label, rows in (("memorized captions", measured[:len(captions)]), ("held-out prompts", measured[len(captions):])):
        range1 = [v for row in rows for v in row["range1"]]
        difference = [t - r for row in rows for t, r in zip(row["torchmetrics"], row["range1"])]
        lines.append(f"| {label} | {len(range1)} | {statistics.mean(range1):.3f} | {spread(difference)} |")

    fits = []
    for caption in captions:
        ours = NeMo(steps=handle.default_steps).fit(handle, caption, seeds)
        row = dict(caption=caption, rounds=len(ours.trace_), twice=listed_twice(handle, ours, caption) if ours.trace_
                   else 0, ours=sum(ours.mask_.counts().values()), ours_similarity=ours.similarity_)
        if not args.no_fits:
            theirs = NeMo(steps=handle.default_steps, duplicates=True).fit(handle, caption, seeds)
            row.update(theirs=sum(theirs.mask_.counts().values()), theirs_similarity=theirs.similarity_,
                       same=all(torch.equal(theirs.mask_.removed[name], removed)
                                for name, removed in ours.mask_.removed.items()))
        fits.append(row)
        print(row, flush=True)

    def cell(row: dict, key: str) -> str:
        if key not in row:
            return "not fitted"
        similarity = row[f"{key}_similarity"]
        return f"{row[key]} ({'—' if similarity is None else f'{similarity:.3f}'})"

    report = f"""# NeMo: the project's own settings against the authors' code, on the bundled model

Written by `{' '.join(['python -m analysis.experiments.nemo_differences', *arguments])}` \
({time.perf_counter() - started:.0f} s). "pixel" settings (δ after two DDIM steps, 7x7 window), {len(seeds)} seeds; \
docs/methods.md §4.2 says what each difference is.

## MS-SSIM: data range 1 against torchmetrics' inferred range

Between-seed MS-SSIM of δ, each prompt's {len(seeds) * (len(seeds) - 1) // 2} pairs in one batch.

| prompts | pairs | mean MS-SSIM, data range 1 | torchmetrics minus data range 1: min / mean / max |
|---|---|---|---|
{chr(10).join(lines)}

## Neurons listed twice

Per memorized caption: the initial selection's rounds, the neurons of its last round that are both outliers and
top-k (the authors' list holds them twice), and the refined mask (neurons, criterion reached) with the project's list
and with the authors'.

| caption | rounds | listed twice | refined, project's list | refined, authors' list | same mask |
|---|---|---|---|---|---|
""" + "\n".join(f"| {row['caption']} | {row['rounds']} | {row['twice']} | {cell(row, 'ours')} | {cell(row, 'theirs')} | "
                f"{'—' if 'same' not in row else ('yes' if row['same'] else 'no')} |" for row in fits) + "\n"
    OUT.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
