"""Is NeMo's refinement faster when several candidates share one UNet call, with the same result?

    python -m analysis.bench.nemo_refinement [--repeats 5] [--captions 2] [--widths 4 16]
                                             [--out docs/results/bench_nemo_refinement.md]

Refinement tries its candidates one after another: each unblocks a layer or a neuron of the current mask, and is
kept when the criterion stays below the threshold, so a kept candidate changes what the next ones are tried against.
Batched speculatively, the next `width` candidates are tried against the current mask in one UNet call, with a mask
per row (each candidate's rows block its own neurons); the results up to the first kept candidate are used, and the
candidates after it are tried again against the new mask. The result is the sequential one exactly when a
candidate's δ is the same computed alone or among others, which this checks.

On the bundled model with the Mitigate view's NeMo settings (4 localizer seeds, the default schedule, "auto"
settings), for the first `--captions` memorized captions, computing what the shipped cache holds (a model the cache
does not cover): NeMo's initial selection once per caption, then its refinement sequentially and batched at each
width, interleaved; the masks and the criterion reached compared for equality; seconds per refinement, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from analysis.bench import seconds, write_report
from analysis.hooks import ForwardHook, hooked
from analysis.localize import nemo
from analysis.localize.nemo import Criterion, NeMo
from analysis.localize.nemo_delta import noise_differences
from analysis.localize.nemo_selection import Blocked, neuron_masks, refine
from analysis.model import load_model

LOCALIZER_SEEDS = [0, 1, 2, 3]  # the Mitigate view's


def zero_rows(removed: torch.Tensor) -> ForwardHook:
    """A forward hook setting, in each row of a value layer's output `[rows, tokens, out]`, the channels where that
    row's `removed` (bool `[rows, out]`) is True to 0."""
    def hook(module, inputs, output: torch.Tensor) -> torch.Tensor:
        if output.shape[0] != len(removed):
            raise RuntimeError(f"{len(removed)} row masks for {output.shape[0]} rows")
        return output.masked_fill(removed[:, None, :].to(output.device), 0.0)
    return hook


def evaluate_many(criterion: Criterion, trials: list[Blocked]) -> list[float]:
    """The criterion of each trial, all in one UNet call per step: rows trial-major, each trial's seeds together."""
    masks = [neuron_masks(trial, criterion.layers) for trial in trials]
    rows = {name: torch.stack([mask[name] for mask in masks]).repeat_interleave(len(criterion.seeds), dim=0)
            for name in criterion.layers}
    hooks = {name: zero_rows(removed) for name, removed in rows.items() if removed.any()}
    criterion.unet_rows += len(trials) * criterion.reading.unet_rows(len(criterion.seeds))
    with hooked(criterion.handle.unet, forward_hooks=hooks):
        deltas = noise_differences(criterion.handle, criterion.text.expand(len(trials), -1, -1), criterion.seeds,
                                   criterion.reading)
    # Each trial's own seeds compared together, as one sequential evaluation does.
    return [criterion.similarity(criterion.unblocked, chunk).max().item()
            for chunk in deltas.split(len(criterion.seeds))]


def refine_batched(blocked: Blocked, similarity: float, criterion: Criterion, threshold: float,
                   width: int) -> tuple[Blocked, float]:
    """`nemo_selection.refine` with up to `width` candidates per UNet call, tried speculatively (module docstring)."""
    def trial_of(current: Blocked, move: tuple) -> tuple[Blocked, bool]:
        name, neuron = move
        if neuron is None:
            return {**current, name: []}, False
        remaining = list(current[name])
        remaining.remove(neuron)
        return {**current, name: remaining}, neuron in remaining

    def speculate(moves: list, start: int, current: Blocked, reached: float) -> dict:
        pending = []
        for index in range(start, len(moves)):
            trial, unchanged = trial_of(current, moves[index])
            if unchanged:  # as `refine` does, without a UNet call
                current = trial if reached < threshold else current
            elif len(pending) < width:
                pending.append((index, trial))
            else:
                break
        values = evaluate_many(criterion, [trial for _, trial in pending])
        return {index: (trial, value) for (index, trial), value in zip(pending, values)}

    def run(moves: list, current: Blocked, reached: float) -> tuple[Blocked, float]:
        tried: dict = {}
        for index, move in enumerate(moves):
            trial, unchanged = trial_of(current, move)
            if not unchanged and (index not in tried or tried[index][0] != trial):
                tried = speculate(moves, index, current, reached)
            value = reached if unchanged else tried[index][1]
            if value < threshold:
                current, reached = trial, value
        return current, reached

    blocked, similarity = run([(name, None) for name in reversed(blocked) if blocked[name]], blocked, similarity)
    neurons = [(name, neuron) for name in reversed(blocked) for neuron in blocked[name]]
    return run(neurons, blocked, similarity)


def initial_states(handle, captions: list[str]) -> list[tuple]:
    """Per caption, what refinement starts from: the initial selection, its similarity, the criterion, the threshold."""
    states = []

    def capture(blocked, reached, criterion, threshold, callback=None):
        states.append((blocked, reached, criterion, threshold))
        return blocked, reached

    original, nemo.refine = nemo.refine, capture
    try:
        for caption in captions:
            NeMo(steps=handle.default_steps, cache_dir=None).fit(handle, caption, LOCALIZER_SEEDS)
    finally:
        nemo.refine = original
    return states


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each (at least 5 for a record)")
    parser.add_argument("--captions", type=int, default=2, help="the first memorized captions")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 16], help="candidates per UNet call")
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_nemo_refinement.md"))
    args = parser.parse_args(argv)
    handle = load_model()
    captions = [m.caption for m in handle.memorized[:args.captions]]
    states = initial_states(handle, captions)
    variants = {"sequential": None, **{f"batched, width {width}": width for width in args.widths}}

    def run(state: tuple, width: int | None) -> tuple[Blocked, float, int]:
        blocked, reached, criterion, threshold = state
        criterion.unet_rows = 0
        if width is None:
            found = refine(blocked, reached, criterion, threshold)
        else:
            found = refine_batched(blocked, reached, criterion, threshold, width)
        return *found, criterion.unet_rows

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, list] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, width in (variants.items() if repeat % 2 == 0 else reversed(variants.items())):
            found = []
            times[name].append(seconds(lambda: found.extend(run(state, width) for state in states)))
            results[name] = found
    load_after = os.getloadavg()[0]

    sequential = results["sequential"]
    rows = []
    for name in variants:
        same = all(a[0] == b[0] and a[1] == b[1] for a, b in zip(results[name], sequential))
        median = statistics.median(times[name])
        rows.append((name, f"{median:.2f} s ({median / statistics.median(times['sequential']):.2f}x)",
                     f"{sum(r[2] for r in results[name])} UNet rows; same masks and criterion: "
                     f"{'yes' if same else 'NO'}"))
    details = "\n".join([
        "Per caption (sequential): " + "; ".join(
            f"“{caption}”: {sum(len(set(b)) for b in blocked.values())} neurons, criterion {reached:.4f}"
            for caption, (blocked, reached, _) in zip(captions, sequential)),
        "", "Every run (s): " + "; ".join(f"{name}: {', '.join(f'{t:.2f}' for t in times[name])}"
                                          for name in variants)])
    write_report(args.out, "NeMo's refinement: candidates one by one or batched",
                 " ".join(["python -m analysis.bench.nemo_refinement", *(sys.argv[1:] if argv is None else argv)]),
                 f"Seconds to refine the initial selections of {len(captions)} captions (all of them, one run), "
                 f"{args.repeats} interleaved runs; the ratio is to the sequential median.",
                 rows, details, load_before, load_after, headers=("refinement", "median", "work and result"))


if __name__ == "__main__":
    main()
