"""The kinds about a trigger set (the `triggers` input, embeddings `[N, 77, d]` of one image's triggers):
"trigger_map", "discrepancy" and "agreement"; see `analysis.tasks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from analysis.agreement import as_neurons, iou_matrix, localize_each
from analysis.discrepancy import activation_discrepancy
from analysis.dispersion import dispersion, reference_sets
from analysis.export import RunRecord
from analysis.hooks import KINDS, nemo_layers, resolve_layers
from analysis.limits import MAX_LOCALIZED_TRIGGERS, MAX_SEED
from analysis.localize.nemo import NeMo
from analysis.localize.wanda import Wanda
from analysis.model import ModelHandle
from analysis.progress import Callback, report
from analysis.projection import Projection
from analysis.sampling import encode_prompts
from analysis.settings import Steps, Target, check, fill, number, setting, whole, whole_number
from analysis.task_settings import (LOCALIZER_BATCH_ROWS, PROJECTION, START_KINDS, embeddings_input,
                                    localizer_config, target_settings)
from analysis.trigger_map import REFERENCE_NAMES, TRIGGERS, MapPoint, TriggerMap, map_triggers


@dataclass
class TriggerMapSettings(Target):
    method: str = setting("umap", "the projection: umap, tsne or pca")
    parameters: dict | None = setting(None, "the projection's parameters (null: its defaults)")
    start_seed: int = whole(0, "seed of the random starts mapped beside the triggers", 0, MAX_SEED)
    start_kinds: list[str] | None = setting(None, "each trigger's start kind (null: all random)")
    replication_rates: list[float | None] | None = setting(None, "each trigger's replication rate (null: unknown)")


@dataclass
class DiscrepancySettings(Steps, Target):
    layers: str = setting("value", "value projections or feed-forward layers")
    prompts: list[str] | None = setting(None, "prompts to compare the triggers with (null: the memorized captions)")
    seed: int = whole(0, "seed of the first denoising step's noise", 0, MAX_SEED)


@dataclass
class AgreementSettings(Target):
    seeds: list[int] | None = setting(None, "seeds of both localizers (null: NeMo's)")
    nemo: dict | None = setting(None, "NeMo's parameters")
    wanda: dict | None = setting(None, "Wanda's parameters (default layers: NeMo's)")


def run_trigger_map(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """The `triggers` input on one projection with the reference sets; every set's pairwise distances."""
    target, prompt, image = target_settings(handle, config, inputs, need_image=False)
    triggers = embeddings_input(handle, inputs, "triggers", 1)
    count = len(triggers)
    parameters = PROJECTION.checked("projection parameter", fill("projection parameter", PROJECTION.defaults(),
                                                                 config["parameters"]))
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
                  start_seed=check(TriggerMapSettings, "start_seed", config["start_seed"]), start_kinds=start_kinds,
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


def run_discrepancy(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """Activation discrepancy per layer of the `triggers` input and of `prompts` (default: the memorized captions)."""
    target, _, _ = target_settings(handle, config, inputs, need_image=False)
    triggers = embeddings_input(handle, inputs, "triggers", 2)
    if config["layers"] not in KINDS:
        raise ValueError(f"layers must be one of {list(KINDS)}, got {config['layers']!r}")
    prompts = [image.caption for image in handle.memorized] if config["prompts"] is None else config["prompts"]
    if not isinstance(prompts, list) or len(prompts) < 2 or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must list at least 2 prompts to compare the triggers with (default: the "
                         f"model's memorized captions), got {prompts!r}")
    steps = handle.default_steps if config["steps"] is None else config["steps"]
    filled = dict(**target, layers=config["layers"], prompts=prompts,
                  seed=check(DiscrepancySettings, "seed", config["seed"]), steps=check(DiscrepancySettings, "steps", steps))
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


def run_agreement(handle: ModelHandle, config: dict, inputs: dict, callback: Callback | None) -> RunRecord:
    """NeMo and Wanda fitted on every `triggers` input; per layer, the IoU of every pair of masks.

    Wanda runs on NeMo's layers unless its `layers` are given, and is compared
    at neuron level (a neuron counts as removed when any of its weights is), so
    that the two methods can be compared with each other. Tensors: the IoU
    matrices `iou.NAME` `[layers, N, N]` (NaN where both masks are empty) and
    every trigger's mask at neuron level, `nemo.I.LAYER` and `wanda.I.LAYER`.
    """
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
    fits = 2 * len(triggers)
    masks = {"nemo": localize_each(NeMo(**nemo["parameters"], batch_size=LOCALIZER_BATCH_ROWS), handle, triggers,
                                   seeds=nemo["seeds"], callback=callback, total=fits)}
    masks["wanda"] = [as_neurons(mask) for mask in localize_each(Wanda(**wanda, batch_size=LOCALIZER_BATCH_ROWS),
                                                                  handle, triggers, seeds=nemo["seeds"],
                                                                  callback=callback, done=len(triggers), total=fits)]
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
