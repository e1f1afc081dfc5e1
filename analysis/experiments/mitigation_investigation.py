"""Why the masks leave replication in place on the bundled model (issue 3): the mitigation experiment's
investigation, run by `python -m analysis.experiments.mitigation --investigation`.

Each function is small and cheap (a few captions, 4 seeds) and answers one
question; `investigate` runs them all for the results file.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.hooks import hook_points, nemo_layers, resolve_layers
from analysis.localize import DEFAULT_CACHE_DIR
from analysis.localize.nemo import SETTINGS, record_activations, reference_statistics
from analysis.localize.nemo_delta import DeltaReading, DeltaSimilarity, calibrate_threshold, noise_differences
from analysis.localize.wanda import Wanda
from analysis.masks import Mask, generate
from analysis.metrics import paired_similarity, replication
from analysis.model import ModelHandle
from analysis.sampling import ddim_schedule

INVESTIGATION_SEEDS = 4
INVESTIGATION_CAPTIONS = (0, 1, 6)  # astronaut, cat, cameraman: replicated on 10/10 seeds
INVESTIGATION_CALIBRATION_PROMPTS = 12  # reference prompts for τ at each investigated step
# Where δ is read: the authors' reading, the first step, and the demo model's ("pixel") reading.
INVESTIGATION_READINGS = {
    "x_T at step 1 (the authors')": dict(step_index=1, advance_latents=False),
    "x_T at step 0": dict(step_index=0, advance_latents=True),
    "x_t after 2 steps (pixel)": dict(step_index=2, advance_latents=True),
}
# τ from the text branch alone (the pixel settings) and with guidance 7 (the authors').
INVESTIGATION_THRESHOLD_GUIDANCE = (1.0, 7.0)
INVESTIGATION_NEURON_COUNTS = (256, 512)
INVESTIGATION_WHOLE_LAYER = "down.2.attn.0.to_v"  # the one value layer whose blocking stopped replication before
INVESTIGATION_WANDA = {
    "5% ff, first step": dict(sparsity=0.05, record_steps=1),
    "5% value, first step": dict(sparsity=0.05, layers="value", record_steps=1),
}


def held_out_correlation(handle: ModelHandle, prompts: list[str], before: torch.Tensor, mask: Mask) -> float:
    """Mean pixel correlation between each prompt's generation (seed 0) without and with `mask`: 1 = unchanged."""
    return paired_similarity(before, generate(handle, prompts, [0], mask))


def z_scores(handle: ModelHandle, layers: dict, reference_prompts: list[str], captions: list[str]) -> dict:
    """NeMo's outlier scores |a − μ| / σ of every neuron of `layers` for each caption: name -> `[captions, out]`."""
    statistics = reference_statistics(handle, layers, reference_prompts, DEFAULT_CACHE_DIR)
    activations = record_activations(handle, layers, captions)
    return {name: (activations[name] - mean_).abs() / std.clamp_min(1e-12)
            for name, (mean_, std) in statistics.items()}


def outlier_scores(handle: ModelHandle, reference_prompts: list[str], memorized: list[str],
                   held_out: list[str]) -> dict:
    """Are the reference statistics right? Largest z and neurons with z > 3 for memorized vs held-out captions."""
    scores = z_scores(handle, nemo_layers(handle.unet), reference_prompts, memorized + held_out)
    z = torch.cat(list(scores.values()), dim=1)
    per_caption = dict(max_z=z.max(dim=1).values.tolist(), above_3=(z > 3).sum(dim=1).tolist())
    split = len(memorized)
    return {group: {key: values[part] for key, values in per_caption.items()}
            for group, part in (("memorized", slice(0, split)), ("held_out", slice(split, None)))}


def delta_signal(handle: ModelHandle, memorized: list[str], held_out: list[str], reference_prompts: list[str],
                 seeds: list[int], readings: dict[str, dict]) -> list[dict]:
    """Where should δ be read on this model, and can NeMo's criterion fall below τ there?

    Per reading: τ (as NeMo calibrates it, from the text branch alone and
    with guidance 7), the mean MS-SSIM between the δ of different seeds for
    memorized and held-out captions, and the MS-SSIM between the δ of two
    different held-out captions with the same seed: the floor of NeMo's
    same-seed blocked-vs-unblocked criterion. The pixel settings' 7x7 window
    throughout: the authors' 11x11 does not fit the coarsest scale of 32x32.
    """
    steps, similarity = handle.default_steps, DeltaSimilarity(SETTINGS["pixel"]["window"])
    pairs = torch.combinations(torch.arange(len(seeds)), r=2)
    rows = []
    for label, where in readings.items():
        reading = DeltaReading(steps, **where)
        thresholds = {f"threshold_guidance_{guidance:g}": calibrate_threshold(
            handle, reference_prompts, seeds, DeltaReading(steps, **where, guidance=guidance), similarity)
            for guidance in INVESTIGATION_THRESHOLD_GUIDANCE}
        deltas = noise_differences(handle, memorized + held_out, seeds, reading)
        per_caption = deltas.view(-1, len(seeds), *deltas.shape[1:])
        between = [similarity(d[pairs[:, 0]], d[pairs[:, 1]]).mean().item() for d in per_caption]
        held = per_caption[len(memorized):]
        caption_pairs = torch.combinations(torch.arange(len(held)), r=2)
        floor = torch.cat([similarity(held[caption_pairs[:, 0], s], held[caption_pairs[:, 1], s])
                           for s in range(len(seeds))]).mean().item()
        timestep = int(ddim_schedule(handle, steps).timesteps[where["step_index"]])
        rows.append(dict(reading=label, **where, timestep=timestep, **thresholds,
                         memorized_between_seeds=between[:len(memorized)],
                         held_out_between_seeds=between[len(memorized):], same_seed_floor=floor))
        print(f"δ {label}: τ {thresholds}, floor {floor:.3f}", flush=True)
    return rows


def neurons_needed(handle: ModelHandle, items: list, reference_prompts: list[str], evaluation_prompts: list[str],
                   held_out_before: torch.Tensor, seeds: list[int], counts: tuple[int, ...],
                   layer_sets: dict[str, dict[str, nn.Linear]]) -> dict:
    """How many value neurons must be blocked? Replication with the N highest-z neurons of a layer set blocked.

    NeMo's initial selection blocks neurons in order of z (and of activation);
    this skips its search and blocks the top N by z directly, for growing N,
    with the held-out correlation of the first caption's mask as side effect.
    """
    results = {}
    for set_name, layers in layer_sets.items():
        scores = z_scores(handle, layers, reference_prompts, [item.caption for item in items])
        flat = torch.cat(list(scores.values()), dim=1)
        sizes = [scores[name].shape[1] for name in scores]
        for count in counts:
            if count > flat.shape[1]:
                continue
            row = dict(neurons=count, replicated=[])
            for index, item in enumerate(items):
                chosen = torch.zeros(flat.shape[1], dtype=torch.bool)
                chosen[flat[index].topk(count).indices] = True
                mask = Mask(dict(zip(scores, chosen.split(sizes))), "top-z", item.caption, handle.name)
                row["replicated"].append(replication(generate(handle, [item.caption], seeds, mask), item.image).rate)
                if index == 0:
                    row["held_out_correlation"] = held_out_correlation(handle, evaluation_prompts, held_out_before,
                                                                       mask)
            results.setdefault(set_name, []).append(row)
            print(f"top {count} z of {set_name}: replicated {row['replicated']}", flush=True)
    return results


def wanda_variants(handle: ModelHandle, items: list, reference_prompts: list[str], evaluation_prompts: list[str],
                   held_out_before: torch.Tensor, seeds: list[int], variants: dict[str, Wanda]) -> dict:
    """Which activations, layers and sparsity would Wanda need? Replication and side effect per variant."""
    results = {}
    for label, wanda in variants.items():
        row = dict(replicated=[], removed=[])
        for index, item in enumerate(items):
            mask = wanda.fit(handle, item.caption).mask_
            row["replicated"].append(replication(generate(handle, [item.caption], seeds, mask), item.image).rate)
            row["removed"].append(sum(mask.counts().values()))
            if index == 0:
                row["held_out_correlation"] = held_out_correlation(handle, evaluation_prompts, held_out_before, mask)
        results[label] = row
        print(f"Wanda {label}: replicated {row['replicated']}", flush=True)
    return results


def investigate(handle: ModelHandle, reference_prompts: list[str], evaluation_prompts: list[str],
                held_out_before: torch.Tensor) -> dict:
    """Every investigation on a few strongly memorized captions and 4 seeds."""
    seeds = list(range(INVESTIGATION_SEEDS))
    items = [handle.memorized[i] for i in INVESTIGATION_CAPTIONS]
    captions = [item.caption for item in items]
    layer = resolve_layers(handle.unet, [INVESTIGATION_WHOLE_LAYER])[INVESTIGATION_WHOLE_LAYER]
    whole_layers = {INVESTIGATION_WHOLE_LAYER: Mask({INVESTIGATION_WHOLE_LAYER: torch.ones(layer.out_features,
                                                                                          dtype=torch.bool)},
                                                    "whole layer", "", handle.name)}
    whole = {name: dict(replicated=[replication(generate(handle, [item.caption], seeds, mask), item.image).rate
                                    for item in items],
                        held_out_correlation=held_out_correlation(handle, evaluation_prompts, held_out_before, mask))
             for name, mask in whole_layers.items()}
    return dict(
        seeds=seeds, captions=captions,
        nemo_neurons=sum(layer.out_features for layer in nemo_layers(handle.unet).values()),
        outlier_scores=outlier_scores(handle, reference_prompts, [m.caption for m in handle.memorized],
                                      evaluation_prompts),
        delta_signal=delta_signal(handle, captions, evaluation_prompts[:len(captions)],
                                  reference_prompts[:INVESTIGATION_CALIBRATION_PROMPTS], seeds,
                                  INVESTIGATION_READINGS),
        whole_value_layer_blocked=whole,
        neurons_needed=neurons_needed(handle, items, reference_prompts, evaluation_prompts, held_out_before, seeds,
                                      INVESTIGATION_NEURON_COUNTS,
                                      {"down and mid (NeMo's)": nemo_layers(handle.unet),
                                       "down, mid and up": hook_points(handle.unet, "value")}),
        wanda_variants=wanda_variants(handle, items, reference_prompts, evaluation_prompts, held_out_before, seeds,
                                      {label: Wanda(reference_prompts, cache_dir=DEFAULT_CACHE_DIR, **settings)
                                       for label, settings in INVESTIGATION_WANDA.items()}))
