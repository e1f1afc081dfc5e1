"""The `run_task` kinds of the Inside view: what the model looks at, and when the copy appears.

* "attention": cross-attention maps of one seed (`analysis.attention.attention_maps`) of the prompt, or of the
  input `embedding` `[1, 77, d]` (a trigger) with `image`/`prompt` naming what it replicates. Images: the
  generation and one overlay per token (`overlay{i}`); tensors: `maps` `[tokens, H, W]`, `token_means`
  `[steps, tokens]` (and `step_maps` when `keep_step_maps`).
* "timeline": x̂₀ at every step of one seed and its similarity to the target (`analysis.timeline`); without
  a training image (`image`) every memorized image is compared, the nearest counting.
* "detect": the three detectors of `analysis.detectors` for the prompt or embedding, each with the
  distribution over the model's reference prompts and the score's percentile in it.
* "reference": the reference distributions alone, as bands (the Replicate view's Wen curve).

Each takes `mitigation` as the other kinds do (computed for the prompt, or the `mask.*` inputs). The
reference distributions are the unmitigated model's, cached per weights (`analysis.detectors.reference_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.attention import attention_maps, overlay
from analysis.detectors import (DETECTORS, NOISE_GAP_PER_STEP, REFERENCE_SEEDS, detector_scores, percentile,
                                reference_scores, summary)
from analysis.export import RunRecord
from analysis.limits import MAX_SEED
from analysis.model import ModelHandle
from analysis.replicate import training_images
from analysis.progress import Callback
from analysis.settings import (DEFAULT_SEEDS, Mitigated, Sampling, Target, check, seeds_setting, setting, whole,
                               whole_number)
from analysis.task_settings import (embeddings_input, mitigated, mitigation_config, sampling_settings,
                                    target_settings)
from analysis.timeline import denoising_timeline

EMBEDDING = "embedding"
REFERENCE_PREFIX = "reference."


def _conditioning(handle: ModelHandle, inputs: dict, prompt: str) -> tuple[str | torch.Tensor, str]:
    """The prompt, or the `embedding` input when given; and which of the two it is."""
    if EMBEDDING not in inputs:
        return prompt, "prompt"
    embedding = embeddings_input(handle, inputs, EMBEDDING, 1)
    if len(embedding) != 1:
        raise ValueError(f"the input {EMBEDDING!r} holds one embedding [1, 77, d], got {len(embedding)}")
    return embedding[0].to(handle.dtype), "embedding"


@dataclass
class TimelineSettings(Mitigated, Sampling, Target):
    seed: int = whole(0, "the seed generated", 0, MAX_SEED)


@dataclass
class AttentionSettings(TimelineSettings):
    layers: list[str] | None = setting(None, "cross-attention layers by hook point (null: all)")
    denoising_steps: list[int] | None = setting(None, "step indices summed (null: all)")
    keep_step_maps: bool = setting(False, "also keep every chosen step's maps")


@dataclass
class DetectSettings(Mitigated, Sampling, Target):
    seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds the detectors average over")


def _one_seed_config(handle: ModelHandle, config: dict, inputs: dict,
                     extra: tuple[str, ...] = ()) -> tuple[dict, str, torch.Tensor | None]:
    """`config` checked for a one-seed kind: target, seed, steps, guidance, mitigation and the `extra` settings."""
    target, prompt, image = target_settings(handle, config, inputs, need_image=False)
    filled = dict(**target, seed=check(TimelineSettings, "seed", config["seed"]), **sampling_settings(handle, config),
                  mitigation=mitigation_config(config["mitigation"], inputs),
                  **{key: config[key] for key in extra})
    return filled, prompt, image


def _run_attention(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    filled, prompt, _ = _one_seed_config(handle, config, inputs, ("layers", "denoising_steps", "keep_step_maps"))
    for key in ("layers", "denoising_steps"):
        if filled[key] is not None and not isinstance(filled[key], list):
            raise ValueError(f"{key} must be a list (or null: all), got {filled[key]!r}")
    if filled["denoising_steps"] is not None:
        filled["denoising_steps"] = sorted({whole_number("a denoising step", step, 0, filled["steps"] - 1)
                                            for step in filled["denoising_steps"]})
    if not isinstance(filled["keep_step_maps"], bool):
        raise ValueError(f"keep_step_maps must be true or false, got {filled['keep_step_maps']!r}")
    conditioning, what = _conditioning(handle, inputs, prompt)
    record = RunRecord("attention", handle.name, filled)
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        maps = attention_maps(handle, conditioning, filled["seed"], filled["steps"], filled["guidance"],
                              filled["layers"], filled["denoising_steps"], filled["keep_step_maps"], callback)
    shares = maps.maps.flatten(1).mean(dim=1)
    record.metrics.update(conditioning=what, layers=maps.layers, denoising_steps=maps.kept_steps,
                          tokens=[dict(text=t.text, kind=t.kind) for t in maps.tokens], token_shares=shares.tolist())
    record.table = [dict(position=i, token=t.text, kind=t.kind, share=share)
                    for i, (t, share) in enumerate(zip(maps.tokens, shares.tolist()))]
    record.images["generated"] = maps.image
    record.images.update({f"overlay{i}": overlay(maps.image, heat) for i, heat in enumerate(maps.normalised())})
    record.tensors.update(maps=maps.maps, token_means=maps.token_means)
    if maps.step_maps is not None:
        record.tensors["step_maps"] = maps.step_maps
    return record


def _run_timeline(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    filled, prompt, image = _one_seed_config(handle, config, inputs)
    conditioning, what = _conditioning(handle, inputs, prompt)
    target = image if image is not None else (training_images(handle) if handle.memorized else None)
    record = RunRecord("timeline", handle.name, filled)
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        timeline = denoising_timeline(handle, conditioning, filled["seed"], filled["steps"], filled["guidance"],
                                      target, callback)
    metric = handle.replication_metric
    record.metrics.update(conditioning=what, timesteps=timeline.timesteps, metric=metric.name,
                          threshold=metric.threshold)
    if timeline.similarities is not None:
        record.metrics.update(similarities=timeline.similarities.tolist(), final_similarity=timeline.final_similarity,
                              lock_in_step=timeline.lock_in_step(metric.threshold))
        record.table = [dict(step=i, timestep=t, similarity=s)
                        for i, (t, s) in enumerate(zip(timeline.timesteps, timeline.similarities.tolist()))]
    record.images.update({f"frame{i}": frame for i, frame in enumerate(timeline.frames)})
    record.images["generated"] = timeline.image
    if image is not None:
        record.images["target"] = image.float().cpu()
    return record


def _reference(handle: ModelHandle, record: RunRecord, steps: int, guidance: float,
               callback: Callback | None) -> dict[str, torch.Tensor]:
    """The reference distributions into the record: `reference` summaries and `reference.NAME` tensors."""
    scores = reference_scores(handle, steps, guidance, callback=callback)
    record.metrics.update(reference={name: summary(values) for name, values in scores.items()},
                          reference_prompts=len(scores["noise_gap"]), reference_seeds=list(REFERENCE_SEEDS))
    record.tensors.update({REFERENCE_PREFIX + name: values for name, values in scores.items()})
    return scores


def _run_detect(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    filled = dict(**target, seeds=check(DetectSettings, "seeds", config["seeds"]), **sampling_settings(handle, config),
                  mitigation=mitigation_config(config["mitigation"], inputs))
    conditioning, what = _conditioning(handle, inputs, prompt)
    record = RunRecord("detect", handle.name, filled)
    batch = [conditioning] if what == "prompt" else conditioning[None]
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        scores = detector_scores(handle, batch, filled["seeds"], filled["steps"], filled["guidance"], callback)
    reference = _reference(handle, record, filled["steps"], filled["guidance"], callback)
    record.metrics.update(conditioning=what, scores={name: scores[name].item() for name in DETECTORS},
                          noise_gap_per_step=scores[NOISE_GAP_PER_STEP][0].tolist(),
                          percentiles={name: percentile(scores[name].item(), reference[name]) for name in DETECTORS})
    record.table = [dict(detector=name, score=record.metrics["scores"][name],
                         percentile=record.metrics["percentiles"][name], **{
                             key: record.metrics["reference"][name][key] for key in ("p05", "median", "p95")})
                    for name in DETECTORS]
    return record


def _run_reference(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    filled = sampling_settings(handle, config)
    record = RunRecord("reference", handle.name, filled)
    _reference(handle, record, filled["steps"], filled["guidance"], callback)
    return record


# What `analysis.tasks.TASKS` runs for the Inside view: each kind's settings class and runner.
INSIDE_TASKS = dict(attention=(AttentionSettings, _run_attention), timeline=(TimelineSettings, _run_timeline),
                    detect=(DetectSettings, _run_detect), reference=(Sampling, _run_reference))
