"""The kinds about one prompt's generations: "replicate", "localize", "sweep", "attribute" and "wen" (see
`analysis.tasks`). Each kind's settings class, above its runner, holds its defaults and ranges; the runner gets
the configuration filled from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.dori import evaluate
from analysis.export import RunRecord
from analysis.limits import MAX_STARTS, MAX_SEED
from analysis.model import ModelHandle
from analysis.progress import Callback
from analysis.replicate import replicate, training_images
from analysis.settings import (DEFAULT_SEEDS, Mitigated, Sampling, Target, as_json, check, defaults, fill, number,
                               real, seeds_setting, setting, whole)
from analysis.sweep import perturbation_sweep
from analysis.task_settings import (ATTRIBUTIONS, embeddings_input, fit_mask, localizer_config, mask_tensors,
                                    method_parameters, mitigated, mitigation_config, replicate_what,
                                    sampling_settings, target_settings)
from analysis.wen_mitigation import WenMitigation


@dataclass
class ReplicateSettings(Mitigated, Sampling, Target):
    seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds to generate")
    threshold: float | None = real(None, "similarity above which an image is a copy (default: the metric's)")


@dataclass
class LocalizeSettings(Target):
    method: str = setting("nemo", "the localizer: nemo (neurons) or wanda (weights)")
    parameters: dict | None = setting(None, "the localizer's parameters (null: its defaults)")
    seeds: list[int] | None = setting(None, "seeds of the localizer (null: the method's)")
    evaluation_seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds generated before and after the mask")


@dataclass
class SweepSettings(Mitigated, Sampling, Target):
    radii: list[float] = setting((0.0, 5.0, 10.0, 20.0), "L2 distances of the perturbations")
    directions: int = whole(4, "random directions per radius", 1, MAX_STARTS)
    seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds generated per direction")
    seed: int = whole(0, "seed of the random directions", 0, MAX_SEED)


@dataclass
class AttributeSettings(Target):
    method: str = setting("gradient_norm", "gradient_norm, integrated_gradients or occlusion")
    parameters: dict | None = setting(None, "the method's parameters (null: its defaults)")


@dataclass
class WenSettings(Sampling, Target):
    parameters: dict | None = setting(None, "`WenMitigation`'s parameters (null: its defaults)")
    seeds: list[int] = seeds_setting(DEFAULT_SEEDS, "seeds generated before and after")


def _replication_metrics(report, prefix: str = "") -> dict:
    metrics = {}
    if report.replication is not None:
        metrics.update({f"{prefix}similarities": report.replication.similarities.tolist(),
                        f"{prefix}replicated": report.replication.replicated.int().tolist(),
                        f"{prefix}rate": report.replication.rate,
                        f"{prefix}mean_similarity": report.replication.similarities.mean().item()})
    if report.noise_gap_per_step is not None:
        metrics[f"{prefix}wen_first_step"] = report.noise_gap_per_step[:, 0].mean().item()
    return metrics


def run_replicate(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    threshold = handle.replication_metric.threshold if config["threshold"] is None else config["threshold"]
    filled = dict(**target, seeds=check(ReplicateSettings, "seeds", config["seeds"]),
                  **sampling_settings(handle, config), threshold=number("threshold", threshold),
                  mitigation=mitigation_config(config["mitigation"], inputs))
    record = RunRecord("replicate", handle.name, filled)
    what = replicate_what(handle, target)
    embedding = embeddings_input(handle, {"embedding": inputs["embedding"][None]}, "embedding", 1)[0] \
        if "embedding" in inputs else None
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        report = replicate(handle, what, filled["seeds"], filled["steps"], filled["guidance"], filled["threshold"],
                           callback=callback, embedding=embedding)
    record.metrics.update(_replication_metrics(report))
    record.images.update({f"seed{seed}": image for seed, image in zip(report.seeds, report.images)})
    record.table = [dict(seed=seed, caption=caption) for seed, caption in zip(report.seeds, report.captions())]
    if report.replication is not None:
        for row, similarity, replicated in zip(record.table, report.replication.similarities.tolist(),
                                               report.replication.replicated.tolist()):
            row.update(similarity=similarity, replicated=replicated)
    if report.noise_gap_per_step is not None:
        record.tensors["noise_gap_per_step"] = report.noise_gap_per_step
    return record


def run_localize(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    localizer = localizer_config(dict(method=config["method"], parameters=config["parameters"], seeds=config["seeds"]))
    evaluation_seeds = check(LocalizeSettings, "evaluation_seeds", config["evaluation_seeds"])
    filled = dict(**target, **localizer, evaluation_seeds=evaluation_seeds)
    record = RunRecord("localize", handle.name, filled)
    mask = fit_mask(handle, localizer, prompt, callback)
    record.tensors.update(mask_tensors(mask))
    counts = mask.counts()
    record.metrics.update(removed=counts, removed_total=sum(counts.values()))
    record.metrics.update({key: value for key, value in mask.parameters.items()
                           if key in ("threshold", "similarity", "memorized_seeds")})
    # Before vs after on the same seeds: does removing the units stop the replication?
    what = replicate_what(handle, target)
    before = replicate(handle, what, evaluation_seeds, callback=callback)
    with mask.applied(handle):
        after = replicate(handle, what, evaluation_seeds, callback=callback)
    record.metrics.update({**_replication_metrics(before, "before_"), **_replication_metrics(after, "after_")})
    for stage, generated in (("before", before), ("after", after)):
        record.images.update({f"{stage}_seed{seed}": image for seed, image in zip(generated.seeds, generated.images)})
    record.table = [dict(layer=name, removed=count, units=int(mask.removed[name].numel()))
                    for name, count in counts.items()]
    return record


def run_sweep(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, image = target_settings(handle, config, inputs, need_image=True)
    if not isinstance(config["radii"], list) or not config["radii"]:
        raise ValueError(f"radii must be a non-empty list of distances, got {config['radii']!r}")
    filled = dict(**target, radii=[number("a radius", r, 0) for r in config["radii"]],
                  **{name: check(SweepSettings, name, config[name]) for name in ("directions", "seeds", "seed")},
                  **sampling_settings(handle, config), mitigation=mitigation_config(config["mitigation"], inputs))
    record = RunRecord("sweep", handle.name, filled)

    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        result = perturbation_sweep(handle, prompt, image, filled["radii"], filled["directions"], filled["seeds"],
                                    filled["seed"], filled["steps"], filled["guidance"], callback=callback)
    record.metrics.update(rates=result.rates().tolist(), mean_similarities=result.mean_similarities().tolist(),
                          embedding_norm=result.embedding_norm)
    record.table = [dict(radius=radius, relative_radius=radius / result.embedding_norm, rate=rate, mean_similarity=s)
                    for radius, rate, s in zip(result.radii, record.metrics["rates"],
                                               record.metrics["mean_similarities"])]
    record.tensors.update(similarities=result.similarities, replicated=result.replicated)
    return record


def run_attribute(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    method = method_parameters("attribution", ATTRIBUTIONS, config)
    record = RunRecord("attribute", handle.name, dict(**target, **method))
    attribution = ATTRIBUTIONS[method["method"]].estimator(**method["parameters"]).attribute(handle, prompt)
    record.metrics.update(score=attribution.score, token_scores=attribution.token_scores.tolist(),
                          word_scores=attribution.word_scores)
    if attribution.convergence_delta is not None:
        record.metrics["convergence_delta"] = attribution.convergence_delta
    record.table = [dict(word=word, score=score) for word, score in zip(attribution.words, attribution.word_scores)]
    record.tensors["token_scores"] = attribution.token_scores
    return record


def run_wen(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """Wen et al.'s inference-time mitigation of a prompt: its embedding and the optimised one, generated alike
    and compared with the target image, or (for any other prompt) with every memorized image, the nearest counting.
    """
    target, prompt, image = target_settings(handle, config, inputs, need_image=False)
    if image is None:
        if not handle.memorized:
            raise ValueError("Wen's mitigation is checked against training images: this model has none "
                             "(give a memorized set, or a 'target' input)")
        image = training_images(handle)
    filled = dict(**target, parameters=as_json(fill("wen parameter", defaults(WenMitigation), config["parameters"])),
                  seeds=check(WenSettings, "seeds", config["seeds"]), **sampling_settings(handle, config))
    record = RunRecord("wen", handle.name, filled)
    result = WenMitigation(**filled["parameters"]).fit(handle, prompt, filled["seeds"])
    generated = evaluate(handle, torch.stack([result.start, result.embedding]), image, filled["seeds"],
                         filled["steps"], filled["guidance"], callback=callback)
    for stage, images, replicated in zip(("before", "after"), generated.images, generated.replication):
        record.metrics.update({f"{stage}_similarities": replicated.similarities.tolist(),
                               f"{stage}_replicated": replicated.replicated.int().tolist(),
                               f"{stage}_rate": replicated.rate})
        record.images.update({f"{stage}_seed{seed}": picture for seed, picture in zip(filled["seeds"], images)})
    record.metrics.update(magnitudes=result.trace, target=result.target, reached=result.reached)
    record.tensors["embedding"] = result.embedding
    return record
