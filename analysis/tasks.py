"""Every analysis as one call with a JSON configuration: what the app, the command line and campaigns run.

    record = run_task(handle, "attack", {"image": 0, "mitigation": {"method": "nemo"}})

`run_task` checks the configuration (ValueError naming the bad value), fills
in every default (the handle's steps and guidance, the localizer's
parameters, ...) so that `record.config` is complete, runs the analysis and
returns an `analysis.export.RunRecord`. Kinds:

* "replicate": `analysis.replicate.replicate` of a training image or a prompt;
* "localize": a NeMo or Wanda mask (tensors `mask.LAYER`), replication before and after it;
* "attack": a Dori search toward a training image, optionally against a mitigated model, then `evaluate`;
* "sweep": `analysis.sweep.perturbation_sweep`;
* "attribute": token attribution by gradient norm, Integrated Gradients or word occlusion;
* "wen": Wen et al.'s inference-time mitigation of a training image's caption, generations before and after;
* "finetune": `analysis.finetune.AdversarialFineTuning` of the targets; the tuned model goes to `out_dir/model`;
* "trigger_map": the `triggers` input on a 2-D map beside the reference sets (`analysis.trigger_map`), and the
  dispersion of every set (`record_map` gives the map back);
* "discrepancy": `analysis.discrepancy.activation_discrepancy` of the `triggers` input and of reference prompts;
* "agreement": NeMo and Wanda fitted on every `triggers` input, pairwise IoU of their masks per layer
  (`analysis.agreement`);
* "attention", "timeline", "detect", "reference": the Inside view's, defined in `analysis.inside_tasks`.

The target is `image` (index of a memorized training image; its caption is
the default prompt) and/or `prompt`. `inputs` are tensors the configuration
refers to: `target` (an image `[3, H, W]` in [-1, 1] instead of a training
image), start embeddings `[77, d]`, `embedding` (what "replicate" generates instead of the prompt's encoding, e.g.
a trigger), `mask.LAYER` (a given mitigation),
`triggers` (embeddings `[N, 77, d]` of one image's triggers, for the last three
kinds, where `image`/`prompt` name what they replicate). They
are stored in the record as `input.NAME`, so `analysis.rerun.rerun` can run
it again. `mitigation` is None, `{"method": "nemo"|"wanda", "parameters": {...}}`
(computed for the prompt) or `{"method": "mask"}` (the `mask.*` inputs).

`callback` receives what the analysis streams (`analysis.progress`): `DenoisingStep` while sampling,
`DoriStep` while searching, `FineTuneProgress` while fine-tuning, `TaskProgress` otherwise. It may raise
`analysis.sampling.SamplingCancelled` to stop.

Every record's configuration also names the dtype and what the model was
analysed against (`ModelHandle.data_settings`): its memorized set, its
reference prompts and the replication metric with its threshold. A recorded
configuration given back must match the handle in these.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch

from analysis.agreement import as_neurons, iou_matrix, localize_each
from analysis.discrepancy import activation_discrepancy
from analysis.dispersion import dispersion, reference_sets
from analysis.dori import DoriPreview, DoriSearch, DoriStep, Start, evaluate
from analysis.export import INPUT_PREFIX, RunRecord
from analysis.finetune import (EVALUATION_SEED_OFFSET, AdversarialFineTuning, FineTuneProgress, resolve_targets,
                               side_effects)
from analysis.hooks import KINDS, nemo_layers, resolve_layers
from analysis.inside_tasks import INSIDE_TASKS
from analysis.limits import MAX_INPUT_MAGNITUDE, MAX_LOCALIZED_TRIGGERS, MAX_SEARCH_STEPS, MAX_SEEDS
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.model import ModelHandle, load_model
from analysis.progress import Callback, report
from analysis.projection import Projection
from analysis.replicate import replicate, training_images
from analysis.sampling import encode_prompts
from analysis.sweep import perturbation_sweep
from analysis.task_settings import (ATTRIBUTIONS, DEFAULT_SEEDS, LOCALIZER_BATCH_ROWS, PROJECTION_PARAMETERS,
                                    START_KINDS, as_json, check_data, check_dtype, check_limits, embeddings_input,
                                    fill, fit_mask, localizer_config, mask_tensors, method_parameters, mitigated,
                                    mitigation_config, number, replicate_what, sampling_settings, seed_list,
                                    target_settings, whole_number)
from analysis.trigger_map import REFERENCE_NAMES, TRIGGERS, MapPoint, TriggerMap, map_triggers
from analysis.wen_mitigation import WenMitigation

# ---------------------------------------------------------------------------------------------------------------
# One function per kind: (handle, config, inputs, callback) -> RunRecord


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


def _run_replicate(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    config = fill("replicate", dict(image=None, prompt=None, seeds=DEFAULT_SEEDS, steps=None, guidance=None,
                                     threshold=None, mitigation=None), config)
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    threshold = handle.replication_metric.threshold if config["threshold"] is None else config["threshold"]
    filled = dict(**target, seeds=seed_list("seeds", config["seeds"]), **sampling_settings(handle, config),
                  threshold=number("threshold", threshold),
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


def _run_localize(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    config = fill("localize", dict(image=None, prompt=None, method="nemo", parameters=None, seeds=None,
                                    evaluation_seeds=DEFAULT_SEEDS), config)
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    localizer = localizer_config(dict(method=config["method"], parameters=config["parameters"], seeds=config["seeds"]))
    evaluation_seeds = seed_list("evaluation_seeds", config["evaluation_seeds"])
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


def _starts(specs, prompt: str, inputs: dict[str, torch.Tensor]) -> tuple[list[dict], list[Start]]:
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"starts must be a non-empty list, got {specs!r}")
    filled, starts = [], []
    for spec in specs:
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "random":
            spec = fill("random start", dict(kind="random", seed=0, scale=None), spec)
            scale = None if spec["scale"] is None else number("start scale", spec["scale"], 0)
            starts.append(Start.random(whole_number("start seed", spec["seed"]), scale))
        elif kind == "prompt":
            spec = fill("prompt start", dict(kind="prompt", text=None), spec)
            spec["text"] = prompt if spec["text"] is None else spec["text"]
            starts.append(Start.prompt(spec["text"]))
        elif kind == "embedding":
            spec = fill("embedding start", dict(kind="embedding", input=None), spec)
            if spec["input"] not in inputs:
                raise ValueError(f"embedding start {spec['input']!r} is not among the inputs {sorted(inputs)}")
            starts.append(Start.embedding(inputs[spec["input"]]))
        else:
            raise ValueError(f"a start is {{'kind': 'random'|'prompt'|'embedding', ...}}, got {spec!r}")
        filled.append(spec)
    return filled, starts


def _run_attack(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    search_defaults = {name: p.default for name, p in inspect.signature(DoriSearch).parameters.items()}
    config = fill("attack", dict(image=None, prompt=None, starts=[dict(kind="random", seed=0)],
                                  search=None, evaluation_seeds=DEFAULT_SEEDS, steps=None, guidance=None,
                                  mitigation=None, preview_every=0, preview_seeds=2), config)
    target, prompt, image = target_settings(handle, config, inputs, need_image=True)
    search = fill("search", search_defaults, config["search"])
    filled_starts, starts = _starts(config["starts"], prompt, inputs)
    filled = dict(**target, starts=filled_starts, search=as_json(search),
                  evaluation_seeds=seed_list("evaluation_seeds", config["evaluation_seeds"]), **sampling_settings(handle, config),
                  mitigation=mitigation_config(config["mitigation"], inputs),
                  preview_every=whole_number("preview_every", config["preview_every"], 0, MAX_SEARCH_STEPS),
                  preview_seeds=whole_number("preview_seeds", config["preview_seeds"], 1, MAX_SEEDS))
    record = RunRecord("attack", handle.name, filled)
    with mitigated(handle, filled["mitigation"], inputs, prompt, record, callback):
        search_callback = _with_previews(handle, image, filled, record, callback)
        result = DoriSearch(**search).fit(handle, image, starts, prompt=prompt, callback=search_callback)
        before = evaluate(handle, result.starts, image, filled["evaluation_seeds"], filled["steps"],
                          filled["guidance"], callback=callback)
        after = evaluate(handle, result.embeddings, image, filled["evaluation_seeds"], filled["steps"],
                         filled["guidance"], callback=callback)
    final_losses = result.losses[-1].tolist()
    distances = result.from_start.l2.norm(dim=1).tolist()
    record.metrics.update(
        final_loss=final_losses, distance_from_start=distances,
        rate_before=before.rates.tolist(), rate=after.rates.tolist(), mean_rate=after.rates.mean().item(),
        mean_similarity=after.similarities.mean(dim=1).tolist(),
        similarities=after.similarities.tolist(), replicated=after.replicated.int().tolist(),
        similarity=after.similarities.mean().item(), similarity_std=after.similarities.mean(dim=1).std(
            correction=0).item())
    record.table = [dict(start=i, kind=spec["kind"], final_loss=loss, distance_from_start=distance,
                         rate_before=rate_before, rate=rate, mean_similarity=similarity)
                    for i, (spec, loss, distance, rate_before, rate, similarity) in enumerate(zip(
                        filled_starts, final_losses, distances, before.rates.tolist(), after.rates.tolist(),
                        record.metrics["mean_similarity"]))]
    record.images["target"] = image.float().cpu()
    for i, generations in enumerate(after.images):
        record.images.update({f"start{i}_seed{seed}": generated
                              for seed, generated in zip(filled["evaluation_seeds"], generations)})
    record.tensors.update(embeddings=result.embeddings, starts=result.starts, losses=result.losses,
                          token_distance_from_start=result.from_start.l2)
    if result.from_prompt is not None:
        record.tensors["token_distance_from_prompt"] = result.from_prompt.l2
    return record


def _with_previews(handle: ModelHandle, image: torch.Tensor, filled: dict, record: RunRecord,
                   callback: Callback | None) -> Callback | None:
    """The search's callback, which also generates the first start's current embedding every `preview_every` steps
    (with `preview_seeds` seeds, inside the run's mitigation; not at the last step, whose embedding the run generates
    right after): each preview goes to `callback` as a `DoriPreview` and into the record (images
    `preview{STEP}_seed{S}`, metrics `preview_similarities`)."""
    every = filled["preview_every"]
    if not every:
        return callback
    seeds = list(range(filled["preview_seeds"]))
    record.metrics["preview_similarities"] = {}

    def on_step(step: DoriStep) -> None:
        if callback is not None:
            callback(step)
        if (step.index + 1) % every or step.index + 1 == step.total:
            return
        shown = evaluate(handle, step.embeddings[:1], image, seeds, filled["steps"], filled["guidance"])
        preview = DoriPreview(step.index + 1, shown.images[0], shown.similarities[0].tolist())
        record.metrics["preview_similarities"][str(preview.step)] = preview.similarities
        record.images.update({f"preview{preview.step}_seed{seed}": picture
                              for seed, picture in zip(seeds, preview.images)})
        if callback is not None:
            callback(preview)

    return on_step


def _run_sweep(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    config = fill("sweep", dict(image=None, prompt=None, radii=[0.0, 5.0, 10.0, 20.0], directions=4,
                                 seeds=DEFAULT_SEEDS, seed=0, steps=None, guidance=None, mitigation=None), config)
    target, prompt, image = target_settings(handle, config, inputs, need_image=True)
    if not isinstance(config["radii"], list) or not config["radii"]:
        raise ValueError(f"radii must be a non-empty list of distances, got {config['radii']!r}")
    filled = dict(**target, radii=[number("a radius", r, 0) for r in config["radii"]],
                  directions=whole_number("directions", config["directions"], 1),
                  seeds=seed_list("seeds", config["seeds"]), seed=whole_number("seed", config["seed"]),
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


def _run_attribute(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    config = fill("attribute", dict(image=None, prompt=None, method="gradient_norm", parameters=None), config)
    target, prompt, _ = target_settings(handle, config, inputs, need_image=False)
    method = method_parameters("attribution", ATTRIBUTIONS, config)
    record = RunRecord("attribute", handle.name, dict(**target, **method))
    attribution = ATTRIBUTIONS[method["method"]](**method["parameters"]).attribute(handle, prompt)
    record.metrics.update(score=attribution.score, token_scores=attribution.token_scores.tolist(),
                          word_scores=attribution.word_scores)
    if attribution.convergence_delta is not None:
        record.metrics["convergence_delta"] = attribution.convergence_delta
    record.table = [dict(word=word, score=score) for word, score in zip(attribution.words, attribution.word_scores)]
    record.tensors["token_scores"] = attribution.token_scores
    return record


def _run_wen(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """Wen et al.'s inference-time mitigation of a prompt: its embedding and the optimised one, generated alike
    and compared with the target image, or (for any other prompt) with every memorized image, the nearest counting.
    """
    wen_defaults = {name: p.default for name, p in inspect.signature(WenMitigation).parameters.items()}
    config = fill("wen", dict(image=None, prompt=None, parameters=None, seeds=DEFAULT_SEEDS, steps=None,
                               guidance=None), config)
    target, prompt, image = target_settings(handle, config, inputs, need_image=False)
    if image is None:
        if not handle.memorized:
            raise ValueError("Wen's mitigation is checked against training images: this model has none "
                             "(give a memorized set, or a 'target' input)")
        image = training_images(handle)
    filled = dict(**target, parameters=as_json(fill("wen parameter", wen_defaults, config["parameters"])),
                  seeds=seed_list("seeds", config["seeds"]), **sampling_settings(handle, config))
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


def _run_finetune(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    config = fill("finetune", dict(targets=[0], out_dir=None, parameters=None, resume=False), config)
    if not isinstance(config["out_dir"], str) or not config["out_dir"]:
        raise ValueError(f"out_dir must name the folder for the checkpoint and the tuned model, got {config['out_dir']!r}")
    defaults = AdversarialFineTuning().get_params()
    # Only the default surrogate is a JSON value; a mask or an image surrogate is the Python API's.
    defaults.pop("surrogate")
    parameters = fill("finetune parameter", defaults, config["parameters"])
    parameters["dori"] = fill("finetune dori", defaults["dori"], parameters["dori"])
    filled = dict(targets=config["targets"], out_dir=config["out_dir"], parameters=as_json(parameters),
                  resume=bool(config["resume"]))
    record = RunRecord("finetune", handle.name, filled)
    result = AdversarialFineTuning(**{**parameters, "dori": DoriSearch(**parameters["dori"])}).fit(
        handle, config["targets"], config["out_dir"], callback=callback, resume=filled["resume"])
    last = result.history[-1]["targets"]
    record.metrics.update(
        model_dir=str(result.model_dir), surrogate_sources=result.surrogate_sources,
        normal_pairs=result.normal_pairs, utility_loss=result.utility_loss,
        normal_loss=[row["normal_loss"] for row in result.history],
        adversarial_loss=[row["adversarial_loss"] for row in result.history],
        **{key: [target.get(key) for target in last]
           for key in ("prompt_replication", "prompt_similarity", "dori_replication", "dori_similarity")})
    record.table = [dict(round=row["round"], caption=target["caption"], **{
        key: target.get(key) for key in ("prompt_replication", "prompt_similarity", "dori_replication",
                                         "dori_similarity")}) for row in result.history for target in row["targets"]]
    for caption, images in result.surrogates.items():
        index = [m.caption for m in handle.memorized].index(caption)
        record.images.update({f"surrogate{index}_{k}": image for k, image in enumerate(images)})

    def on_step(step) -> None:
        if callback is not None:
            callback(FineTuneProgress(len(result.history) - 1, len(result.history), "side effects", step.index,
                                      step.total))

    seeds = range(EVALUATION_SEED_OFFSET, EVALUATION_SEED_OFFSET + parameters["eval_seeds"])
    effects = side_effects(handle, load_model(result.model_dir, device=handle.device, dtype=handle.dtype,
                                              replication_metric=handle.replication_metric),
                           resolve_targets(handle, config["targets"]), seeds, on_step)
    record.metrics.update(others=effects["others"],
                          held_out=[dict(prompt=row["prompt"], similarity=row["similarity"])
                                    for row in effects["held_out"]])
    for k, row in enumerate(effects["held_out"]):
        record.images.update({f"held_out{k}_before": row["before"][0], f"held_out{k}_after": row["after"][0]})
    return record


def _run_trigger_map(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """The `triggers` input on one projection with the reference sets; every set's pairwise distances."""
    config = fill("trigger_map", dict(image=None, prompt=None, method="umap", parameters=None, start_seed=0,
                                       start_kinds=None, replication_rates=None), config)
    target, prompt, image = target_settings(handle, config, inputs, need_image=False)
    triggers = embeddings_input(handle, inputs, "triggers", 1)
    count = len(triggers)
    parameters = as_json(fill("projection parameter", PROJECTION_PARAMETERS, config["parameters"]))
    whole_number("the projection's seed", parameters["seed"])
    projection = Projection(config["method"], **parameters)
    start_kinds = ["random"] * count if config["start_kinds"] is None else config["start_kinds"]
    rates = [None] * count if config["replication_rates"] is None else config["replication_rates"]
    if not isinstance(start_kinds, list) or len(start_kinds) != count or any(k not in START_KINDS for k in start_kinds):
        raise ValueError(f"start_kinds must list one of {START_KINDS} per trigger ({count}), got {start_kinds!r}")
    if not isinstance(rates, list) or len(rates) != count:
        raise ValueError(f"replication_rates must hold one rate (or null) per trigger ({count}), got {rates!r}")
    rates = [None if rate is None else number("a replication rate", rate, 0) for rate in rates]
    filled = dict(**target, method=config["method"], parameters=parameters,
                  start_seed=whole_number("start_seed", config["start_seed"]), start_kinds=start_kinds,
                  replication_rates=rates)
    record = RunRecord("trigger_map", handle.name, filled)
    references = reference_sets(handle, n_random=count, seed=filled["start_seed"])
    trigger_map = map_triggers(handle, triggers, references, projection, prompt, filled["start_seed"], start_kinds,
                               rates)
    sets = {TRIGGERS: triggers.cpu(), **{REFERENCE_NAMES[name]: embeddings for name, embeddings in references.items()}}
    # A set of one embedding (one trigger, and so one random start) has no pairs to measure.
    summaries = dispersion({name: embeddings for name, embeddings in sets.items() if len(embeddings) >= 2},
                           parameters["tokens"])
    evaluated = [rate for rate in rates if rate is not None]
    # UMAP's and t-SNE's coordinates need not repeat to the last digit elsewhere: they are in the table only.
    record.metrics.update(
        dispersion={name: summary.as_dict() for name, summary in summaries.items()}, triggers=count,
        evaluated=len(evaluated), replicating=sum(rate > 0 for rate in evaluated),
        mean_replication_rate=sum(evaluated) / len(evaluated) if evaluated else None)
    record.table = [dataclasses.asdict(point) for point in trigger_map.points]
    if image is not None:
        record.images["target"] = image.float().cpu()
    return record


def record_map(record: RunRecord) -> TriggerMap:
    """The map a "trigger_map" record holds (one table row per point), to plot it."""
    if record.kind != "trigger_map":
        raise ValueError(f"a {record.kind} record holds no trigger map")
    return TriggerMap(record.config["method"], record.config["prompt"], [MapPoint(**row) for row in record.table])


def _run_discrepancy(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """Activation discrepancy per layer of the `triggers` input and of `prompts` (default: the memorized captions)."""
    config = fill("discrepancy", dict(image=None, prompt=None, layers="value", prompts=None, seed=0, steps=None),
                   config)
    target, _, _ = target_settings(handle, config, inputs, need_image=False)
    triggers = embeddings_input(handle, inputs, "triggers", 2)
    if config["layers"] not in KINDS:
        raise ValueError(f"layers must be one of {list(KINDS)}, got {config['layers']!r}")
    prompts = [image.caption for image in handle.memorized] if config["prompts"] is None else config["prompts"]
    if not isinstance(prompts, list) or len(prompts) < 2 or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must list at least 2 prompts to compare the triggers with (default: the "
                         f"model's memorized captions), got {prompts!r}")
    steps = handle.default_steps if config["steps"] is None else config["steps"]
    filled = dict(**target, layers=config["layers"], prompts=prompts, seed=whole_number("seed", config["seed"]),
                  steps=whole_number("steps", steps, 1, 1000))
    record = RunRecord("discrepancy", handle.name, filled)
    settings = (filled["layers"], filled["seed"], filled["steps"])
    results = {"triggers": activation_discrepancy(handle, triggers, *settings)}
    report(callback, "discrepancy", 1, 2, "triggers")
    results["prompts"] = activation_discrepancy(handle, encode_prompts(handle, prompts), *settings)
    report(callback, "discrepancy", 2, 2, "prompts")
    record.metrics.update({name: result.as_dict() for name, result in results.items()})
    record.table = [dict(layer=layer, **{f"{name}_{key}": value for name in results
                                         for key, value in record.metrics[name][layer].items()})
                    for layer in results["triggers"].layers]
    return record


def _run_agreement(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """NeMo and Wanda fitted on every `triggers` input; per layer, the IoU of every pair of masks.

    Wanda runs on NeMo's layers unless its `layers` are given, and is compared
    at neuron level (a neuron counts as removed when any of its weights is), so
    that the two methods can be compared with each other. Tensors: the IoU
    matrices `iou.NAME` `[layers, N, N]` (NaN where both masks are empty) and
    every trigger's mask at neuron level, `nemo.I.LAYER` and `wanda.I.LAYER`.
    """
    config = fill("agreement", dict(image=None, prompt=None, seeds=None, nemo=None, wanda=None), config)
    target, _, _ = target_settings(handle, config, inputs, need_image=False)
    triggers = embeddings_input(handle, inputs, "triggers", 2)
    if len(triggers) > MAX_LOCALIZED_TRIGGERS:
        raise ValueError(f"agreement localizes each trigger: give at most {MAX_LOCALIZED_TRIGGERS}, got {len(triggers)}")
    nemo = localizer_config(dict(method="nemo", parameters=config["nemo"], seeds=config["seeds"]))
    wanda = localizer_config(dict(method="wanda", parameters=config["wanda"], seeds=nemo["seeds"]))["parameters"]
    if "layers" not in (config["wanda"] or {}):
        layers = nemo["parameters"]["layers"]
        wanda["layers"] = list(nemo_layers(handle.unet) if layers is None else resolve_layers(handle.unet, layers))
    filled = dict(**target, seeds=nemo["seeds"], nemo=nemo["parameters"], wanda=wanda)
    record = RunRecord("agreement", handle.name, filled)
    report(callback, "agreement", 0, 2, f"NeMo on {len(triggers)} triggers")
    masks = {"nemo": localize_each(NeMo(**nemo["parameters"], batch_size=LOCALIZER_BATCH_ROWS), handle, triggers,
                                   seeds=nemo["seeds"], callback=callback)}
    report(callback, "agreement", 1, 2, f"Wanda on {len(triggers)} triggers")
    masks["wanda"] = [as_neurons(mask) for mask in localize_each(Wanda(**wanda, batch_size=LOCALIZER_BATCH_ROWS),
                                                                  handle, triggers, seeds=nemo["seeds"],
                                                                  callback=callback)]
    report(callback, "agreement", 2, 2, "IoU")
    matrices = {"nemo_nemo": iou_matrix(masks["nemo"]), "wanda_wanda": iou_matrix(masks["wanda"]),
                "nemo_wanda": iou_matrix(masks["nemo"], masks["wanda"])}
    layers = matrices["nemo_wanda"].layers  # every layer of either method
    for method, method_masks in masks.items():
        counts = [mask.counts() for mask in method_masks]
        record.metrics[f"{method}_neurons"] = {layer: sum(c.get(layer, 0) for c in counts) / len(counts)
                                               for layer in layers}
        for i, mask in enumerate(method_masks):
            record.tensors.update({f"{method}.{i}.{name}": removed for name, removed in mask.removed.items()})
    for name, matrix in matrices.items():
        means, undefined = matrix.layer_means(), matrix.undefined_shares()
        record.metrics[name] = {layer: dict(mean_iou=means[layer], undefined=undefined[layer])
                                for layer in matrix.layers}
        record.tensors[f"iou.{name}"] = matrix.values
    record.table = [dict(layer=layer, **{f"{method}_neurons": record.metrics[f"{method}_neurons"][layer]
                                         for method in masks},
                         **{f"{name}_{key}": record.metrics[name].get(layer, {}).get(key)
                            for key in ("mean_iou", "undefined") for name in matrices})
                    for layer in layers]
    return record


TASKS: dict[str, Callable[[ModelHandle, dict, dict, Callback | None], RunRecord]] = {
    "replicate": _run_replicate,
    "localize": _run_localize,
    "attack": _run_attack,
    "sweep": _run_sweep,
    "attribute": _run_attribute,
    "wen": _run_wen,
    "finetune": _run_finetune,
    "trigger_map": _run_trigger_map,
    "discrepancy": _run_discrepancy,
    "agreement": _run_agreement,
    **INSIDE_TASKS,
}


def run_task(handle: ModelHandle, kind: str, config: dict | None = None, callback: Callback | None = None,
             inputs: dict[str, torch.Tensor] | None = None) -> RunRecord:
    """Run one analysis of `kind` with `config` (see the module docstring) and return its complete record."""
    if kind not in TASKS:
        raise ValueError(f"unknown analysis {kind!r}; choose one of {sorted(TASKS)}")
    config = dict(config or {})
    dtype = check_dtype(handle, config)
    data = check_data(handle, config)
    for key in ("dtype", *data):
        config.pop(key, None)
    inputs = dict(inputs or {})
    check_limits(config)
    for name, tensor in inputs.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"input {name!r} must be a tensor, got {type(tensor).__name__}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"input {name!r} holds NaN or infinite values")
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max() > MAX_INPUT_MAGNITUDE:
            raise ValueError(f"input {name!r} holds values up to {tensor.abs().max().item():.3g}; inputs are "
                             f"accepted up to ±{MAX_INPUT_MAGNITUDE:g} (a text embedding's values stay far below)")
    record = TASKS[kind](handle, config, inputs, callback)
    record.config = as_json({**record.config, "dtype": dtype, **data})
    record.tensors.update({INPUT_PREFIX + name: tensor for name, tensor in inputs.items()})
    return record
